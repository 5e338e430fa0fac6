"""Correlation congruence: ``cc_loss`` and ``CCLoss`` (Peng et al., "Correlation Congruence
for Knowledge Distillation", ICCV 2019)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.cc import CORE
from kdfast.reference.cc import KERNELS, VARIANTS

FEATURE_NDIMS = (2, 3, 4, 5)


def check_cc_options(variant: str = "torchdistill", kernel: str = "gaussian",
                     gamma: float = 0.4, order: int = 2, squared: bool = False,
                     reduction: str = "mean") -> None:
    _checks.check_choice("variant", variant, VARIANTS)
    _checks.check_choice("kernel", kernel, KERNELS)
    _checks.check_positive("gamma", gamma)
    _checks.check_int("order", order)
    _checks.check_flag("squared", squared)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, *, variant: str = "torchdistill",
            kernel: str = "gaussian", gamma: float = 0.4, order: int = 2,
            squared: bool = False, reduction: str = "mean",
            backend: str | None = None) -> torch.Tensor:
    r"""Correlation congruence loss (Peng et al., 2019).

    Default, ``variant="torchdistill"`` (torchdistill's ``CCKDLoss`` with its example config:
    Gaussian kernel, ``gamma=0.4``, ``max_p=2``, ``reduction='batchmean'``): on the embeddings
    q_i (inputs flattened to (B, D); D may differ between the sides) and their batch Gram
    G = Q Qᵀ,

    .. math::
        K = e^{-2\gamma}\sum_{p=0}^{P}\frac{(2\gamma)^p}{p!}\,G^{\circ p},\qquad
        \mathcal{L} = \frac{1}{B^2}\,\lVert K_s - K_t\rVert_F

    the order-P Taylor expansion of the Gaussian RBF exp(−γ‖q_i − q_j‖²), exact in the limit
    for unit-norm q (the paper projects and normalises the embeddings first; pass them so).
    ``kernel="bilinear"`` uses K = G. torchdistill (``torch.dist``) takes the plain Frobenius
    norm; ``squared=True`` gives the paper's ‖K_s − K_t‖²_F / B².

    ``variant="repdistiller"``: RepDistiller's ``Correlation`` (code the CRD authors got from
    the CC authors), which builds no kernel matrix: with δ = |s − t| (same shapes),
    loss = mean over i < B−1 of Σ_d δ_{i,d} δ_{i+1,d}, the product of the residuals of
    consecutive samples. ``kernel``, ``gamma``, ``order`` and ``squared`` do not apply to it.

    Args:
        student: (B, D_s) embeddings, or (B, ...) features flattened per sample. B >= 2.
        teacher: (B, D_t) embeddings or features (the same shape for ``"repdistiller"``).
        variant: ``"torchdistill"`` (default) or ``"repdistiller"``.
        kernel: ``"gaussian"`` (default) or ``"bilinear"``.
        gamma: γ of the Gaussian kernel, > 0, default 0.4.
        order: P, the highest power of the Taylor expansion (torchdistill's ``max_p``), an
            int >= 1, default 2 (0 would make K a constant).
        squared: the paper's squared norm instead of torchdistill's norm (default False).
        reduction: ``"mean"`` (default) gives the loss above; ``"sum"`` and ``"none"`` act on
            (B,) per-row values whose mean is the loss: ``‖D_i‖² / (B ‖D‖_F)`` for row i of
            D = K_s − K_t (``‖D_i‖² / B`` with ``squared``; the rows share ‖D‖_F, a batch
            statistic), and for ``"repdistiller"`` ``B/(B−1) Σ_d δ_i δ_{i+1}`` (0 for the last).
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
        >>> t = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
        >>> kdfast.functional.cc_loss(s, t)  # doctest: +SKIP
    """
    check_cc_options(variant, kernel, gamma, order, squared, reduction)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, D) or (B, ...)")
    if variant == "repdistiller":
        _checks.check_same_shape(student, teacher, fix=(
            "variant='repdistiller' compares the features entry by entry; map the student to "
            "the teacher's shape first, or use variant='torchdistill'"))
    _checks.check_same_batch(student, teacher)
    if student.shape[0] < 2:
        raise ValueError(f"CC relates the samples of a batch: student and teacher need a "
                         f"batch size of at least 2, got {student.shape[0]}; drop such "
                         "batches (e.g. DataLoader(drop_last=True))")
    student, teacher = _checks.promote(student, teacher)
    core = backends.choose(CORE, backend, student, teacher).fn
    per_row = core(student, teacher, variant, kernel, float(gamma), int(order), squared)
    return _checks.reduce(per_row, reduction)


class CCLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.cc_loss`; ``forward(student, teacher)``.

    Example:
        >>> kdfast.CCLoss()(torch.randn(16, 64), torch.randn(16, 64))  # doctest: +SKIP
    """

    function = staticmethod(cc_loss)
    validate = staticmethod(check_cc_options)

    def __init__(self, variant: str = "torchdistill", kernel: str = "gaussian",
                 gamma: float = 0.4, order: int = 2, squared: bool = False,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(variant=variant, kernel=kernel, gamma=gamma, order=order,
                         squared=squared, reduction=reduction, backend=backend)

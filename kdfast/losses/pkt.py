"""Probabilistic knowledge transfer: ``pkt_loss`` and ``PKTLoss`` (Passalis & Tefas, "Learning
Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.pkt import CORE
from kdfast.reference.pkt import PKT_EPS

FEATURE_NDIMS = (2, 3, 4, 5)


def check_pkt_options(eps: float = PKT_EPS, reduction: str = "mean") -> None:
    _checks.check_positive("eps", eps)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, *, eps: float = PKT_EPS,
             reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""Probabilistic knowledge transfer loss (Passalis & Tefas, 2018), RepDistiller's ``PKT``.

    On the embeddings q_i (inputs flattened to (B, D); D may differ between the sides):

    .. math::
        K_{ij} = \frac{\langle q_i, q_j\rangle}{(\lVert q_i\rVert + \epsilon)
                 (\lVert q_j\rVert + \epsilon)},\quad
        P_{ij} = \frac{(K_{ij} + 1)/2}{\sum_k (K_{ik} + 1)/2},\quad
        \mathcal{L} = \frac{1}{B^2}\sum_{i,j} P^t_{ij}
                      \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    with ε = 1e-7 (RepDistiller's and torchdistill's ``PKTLoss``), the conditional
    probabilities of the cosine similarities of the batch. The cosine matrices are the batch
    Gram of unit rows (:func:`kdfast.reference.gram.cosine_gram`). NaN inputs give NaN
    (RepDistiller zeroes NaN entries of the normalised rows instead). float16/bfloat16 are
    computed in float32.

    Args:
        student: (B, D_s) embeddings, or (B, ...) features flattened per sample.
        teacher: (B, D_t) embeddings or features.
        eps: the ε of the norms and of the log, > 0, default 1e-7.
        reduction: ``"mean"`` (default) gives the loss above; ``"sum"`` and ``"none"`` act on
            the (B,) per-row values ``sum_j P^t_ij log(...) / B`` whose mean is the loss.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s, t = torch.randn(64, 128), torch.randn(64, 512)
        >>> kdfast.functional.pkt_loss(s, t)  # doctest: +SKIP
    """
    check_pkt_options(eps, reduction)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_same_batch(student, teacher)
    student, teacher = _checks.promote(student, teacher)
    per_row = backends.choose(CORE, backend, student, teacher).fn(student, teacher, float(eps))
    return _checks.reduce(per_row, reduction)


class PKTLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.pkt_loss`; ``forward(student, teacher)``.

    Example:
        >>> kdfast.PKTLoss()(torch.randn(16, 64), torch.randn(16, 256))  # doctest: +SKIP
    """

    function = staticmethod(pkt_loss)
    validate = staticmethod(check_pkt_options)

    def __init__(self, eps: float = PKT_EPS, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(eps=eps, reduction=reduction, backend=backend)

"""Similarity-preserving distillation: ``sp_loss`` and ``SPLoss`` (Tung & Mori,
"Similarity-Preserving Knowledge Distillation", ICCV 2019)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.distributed import gather_batch
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.gram import SIMILARITY

FEATURE_NDIMS = (2, 3, 4, 5)


def check_sp_options(reduction: str = "mean", gather: bool = False) -> None:
    _checks.check_flag("gather", gather)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean",
            gather: bool = False, backend: str | None = None) -> torch.Tensor:
    r"""Similarity-preserving loss (Tung & Mori, 2019).

    .. math::
        G = \mathrm{rownormalise}(Q Q^\top),\qquad
        \mathcal{L} = \frac{1}{B^2}\lVert G_t - G_s\rVert_F^2

    with Q the features flattened to B x (C·H·W) and each row of the B x B matrix divided by
    max(its L2 norm, 1e-12) (an all-zero sample gives a zero row, no NaN). Only the batch
    sizes must match: channels, sizes and even ranks may differ. Invariant to a positive
    scale of either input. float16/bfloat16 inputs are computed (and returned) in float32.

    Args:
        student: (B, ...) student features, e.g. (B, C_s, H_s, W_s) or (B, D_s).
        teacher: (B, ...) teacher features.
        reduction: ``"mean"`` (default) gives the loss above; ``"sum"`` and ``"none"`` act on
            the (B,) per-row losses ``sum_j (G_t - G_s)_ij^2 / B`` whose mean is the loss.
        gather: compute over the global batch of all ranks of the initialised
            ``torch.distributed`` process group (all-gather with autograd, see
            :mod:`kdfast.distributed`); B is then the global batch. No-op without one.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``,
            ``"triton"`` or ``"reference"`` for the ``"similarity"`` core.

    Example:
        >>> s, t = torch.randn(64, 64, 8, 8), torch.randn(64, 256, 8, 8)
        >>> kdfast.functional.sp_loss(s, t)  # doctest: +SKIP
    """
    check_sp_options(reduction, gather)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, ...)")
    _checks.check_same_batch(student, teacher)
    student, teacher = _checks.promote(student, teacher)
    if gather:
        student, teacher = gather_batch(student), gather_batch(teacher)
    similarity = backends.choose(SIMILARITY, backend, student, teacher).fn
    return _checks.reduce(similarity(student, teacher), reduction)


class SPLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.sp_loss`; ``forward(student, teacher)``.

    Example:
        >>> kdfast.SPLoss()(torch.randn(8, 16, 4, 4), torch.randn(8, 32, 2, 2))  # doctest: +SKIP
    """

    function = staticmethod(sp_loss)
    validate = staticmethod(check_sp_options)

    def __init__(self, reduction: str = "mean", gather: bool = False,
                 backend: str | None = None) -> None:
        super().__init__(reduction=reduction, gather=gather, backend=backend)

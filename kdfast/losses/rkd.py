"""Relational knowledge distillation: ``rkd_loss`` and ``RKDLoss`` (Park et al., "Relational
Knowledge Distillation", CVPR 2019), distance and angle terms."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.distributed import gather_batch
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.rkd import CORE

FEATURE_NDIMS = (2, 3, 4, 5)


def check_rkd_options(distance_weight: float = 25.0, angle_weight: float = 50.0,
                      reduction: str = "mean", gather: bool = False) -> None:
    _checks.check_flag("gather", gather)
    _checks.check_positive("distance_weight", distance_weight, inclusive=True)
    _checks.check_positive("angle_weight", angle_weight, inclusive=True)
    if distance_weight == 0 and angle_weight == 0:
        raise ValueError("distance_weight and angle_weight are both 0: nothing to compute; "
                         "give at least one a positive weight")
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0, reduction: str = "mean", gather: bool = False,
             backend: str | None = None) -> torch.Tensor:
    r"""Relational KD loss (Park et al., 2019): distance term x 25 + angle term x 50.

    On embeddings x_i (rows of the inputs flattened to (B, D); D may differ between student
    and teacher):

    .. math::
        \psi_D(i,j) = \frac{\lVert x_i - x_j\rVert}{\mu},\quad
        \psi_A(i,j,k) = \langle e_{ij}, e_{kj}\rangle,\quad
        e_{ij} = \frac{x_i - x_j}{\lVert x_i - x_j\rVert}

    with :math:`\mu` the mean of the positive pairwise distances. Loss =
    ``distance_weight`` · mean over all B² entries of smooth-L1(ψ_D^s, ψ_D^t) +
    ``angle_weight`` · mean over all B³ entries of smooth-L1(ψ_A^s, ψ_A^t) (β = 1; the
    peers' denominators, diagonal entries included).

    Numerics: relations in float32 (float64 stays float64; the loss is returned in that
    dtype), from exact differences; degenerate entries (i = j, identical rows) have distance
    and direction 0 and pass no gradient (the peers give them ~1e9 gradients). The teacher's
    relations are computed without gradient (the teacher is detached). Memory
    O(B²·D + B³).

    Args:
        student: (B, D_s) embeddings, or (B, ...) features flattened per sample. B >= 2.
        teacher: (B, D_t) embeddings or features.
        distance_weight: weight of the distance term, >= 0, default 25.0 (0 skips it).
        angle_weight: weight of the angle term, >= 0, default 50.0 (0 skips it).
        reduction: ``"mean"`` (default) gives the loss above; ``"sum"`` and ``"none"`` act on
            the (B,) per-anchor values (``w_d`` · row i of the distance term + ``w_a`` · the
            angles with vertex i) whose mean is the loss. They are not independent per
            sample: μ is a batch statistic.
        gather: compute over the global batch of all ranks of the initialised
            ``torch.distributed`` process group (all-gather with autograd, see
            :mod:`kdfast.distributed`); B is then the global batch. No-op without one.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core yet).

    Example:
        >>> s, t = torch.randn(32, 64), torch.randn(32, 128)
        >>> kdfast.functional.rkd_loss(s, t)  # doctest: +SKIP
    """
    check_rkd_options(distance_weight, angle_weight, reduction, gather)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_same_batch(student, teacher)
    student, teacher = _checks.promote(student, teacher)
    if gather:
        student, teacher = gather_batch(student), gather_batch(teacher)
    if student.shape[0] < 2:
        raise ValueError(f"RKD relates the samples of a batch: student and teacher need a "
                         f"batch size of at least 2, got {student.shape[0]}; drop such "
                         "batches (e.g. DataLoader(drop_last=True))")
    core = backends.choose(CORE, backend, student, teacher).fn
    per_anchor = core(student, teacher, float(distance_weight), float(angle_weight))
    return _checks.reduce(per_anchor, reduction)


class RKDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.rkd_loss`; ``forward(student, teacher)``.

    Args:
        distance_weight: default 25.0. angle_weight: default 50.0.
        reduction: default ``"mean"``. backend: default None.

    Example:
        >>> kdfast.RKDLoss()(torch.randn(16, 64), torch.randn(16, 256))  # doctest: +SKIP
    """

    function = staticmethod(rkd_loss)
    validate = staticmethod(check_rkd_options)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 reduction: str = "mean", gather: bool = False,
                 backend: str | None = None) -> None:
        super().__init__(distance_weight=distance_weight, angle_weight=angle_weight,
                         reduction=reduction, gather=gather, backend=backend)

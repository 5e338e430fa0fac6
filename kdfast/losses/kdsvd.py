"""Self-supervised KD with singular value decomposition: ``kdsvd_loss`` and ``KDSVDLoss`` (Lee,
Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV
2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.kdsvd import CORE


def check_kdsvd_options(k: int = 1, reduction: str = "mean") -> None:
    _checks.check_int("k", k)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def _check_maps(name: str, maps) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence):
        raise TypeError(f"{name} must be a list of (B, C, H, W) feature maps, got "
                        f"{type(maps).__name__}")
    for i, f in enumerate(maps):
        _checks.check_features(f"{name}[{i}]", f)
    return list(maps)


def kdsvd_loss(student_features: Sequence[torch.Tensor],
               teacher_features: Sequence[torch.Tensor], *, k: int = 1,
               reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""KDSVD loss (Lee et al., 2018), RepDistiller's ``KDSVD(k=1)`` summed over the pairs.

    Per map F (B, C, H, W), X = F as (B, H·W, C) = U S Vᵀ: the teacher keeps its top ``k``
    right singular vectors and its top-k singular values normalised to a unit vector s_t;
    the student keeps its top k + 3 vectors, of which, for each teacher vector, the one of
    largest |cosine| is picked with that cosine's sign. Both are scaled, W = V diag(s_t).
    Between consecutive maps l − 1 and l:

    .. math::
        R_{b,i,j,m} = \exp\!\big(-(W^{l}_{b,i,m} - W^{l-1}_{b,j,m})^2 / 8\big),\qquad
        \ell_b = \sum_{l}\sum_{i,j,m}\big(R^s_{b,i,j,m} - R^t_{b,i,j,m}\big)^2

    (non-finite entries count 0; the teacher side is detached). ``reduction="mean"`` is
    ``sum(KDSVD(k)(g_s, g_t))`` of RepDistiller (each pair's sum divided by B). RepDistiller
    reshapes with H·H; here H·W (the same for square maps).

    Gradients through an SVD divide by gaps between singular values (all of them, not only
    the top k): they are large and ill-conditioned where two nearly coincide, as in every
    SVD-based loss. float16/bfloat16 inputs are computed in float32.

    Args:
        student_features: >= 2 student maps (B, C_l, H_l, W_l), e.g. consecutive stages.
        teacher_features: as many teacher maps; map l has the student's C_l (sizes may
            differ: the vectors live in channel space).
        k: singular vectors kept per teacher map, an int >= 1, default 1.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> g_s = [torch.randn(8, 16, 8, 8), torch.randn(8, 32, 4, 4)]
        >>> g_t = [torch.randn(8, 16, 8, 8), torch.randn(8, 32, 4, 4)]
        >>> kdfast.functional.kdsvd_loss(g_s, g_t)  # doctest: +SKIP
    """
    check_kdsvd_options(k, reduction)
    student_features = _check_maps("student_features", student_features)
    teacher_features = _check_maps("teacher_features", teacher_features)
    if len(student_features) != len(teacher_features) or len(student_features) < 2:
        raise ValueError(f"student_features and teacher_features must be lists of the same "
                         f"length >= 2 (KDSVD relates consecutive maps), got "
                         f"{len(student_features)} and {len(teacher_features)}")
    first = student_features[0]
    for i, (f_s, f_t) in enumerate(zip(student_features, teacher_features, strict=True)):
        _checks.check_same_batch(first, f_s, ("student_features[0]", f"student_features[{i}]"))
        _checks.check_same_batch(f_s, f_t, (f"student_features[{i}]", f"teacher_features[{i}]"))
        if f_s.shape[1] != f_t.shape[1]:
            raise ValueError(f"student_features[{i}] has {f_s.shape[1]} channels but "
                             f"teacher_features[{i}] has {f_t.shape[1]}; KDSVD compares "
                             "singular vectors in channel space: map the student with a 1x1 "
                             "conv first")
    promoted = _checks.promote(*student_features, *teacher_features)
    student_features = list(promoted[:len(promoted) // 2])
    teacher_features = list(promoted[len(promoted) // 2:])
    core = backends.choose(CORE, backend, *student_features, *teacher_features).fn
    return _checks.reduce(core(student_features, teacher_features, int(k)), reduction)


class KDSVDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.kdsvd_loss`;
    ``forward(student_features, teacher_features)``.

    Example:
        >>> g = [torch.randn(4, 8, 4, 4), torch.randn(4, 16, 2, 2)]
        >>> kdfast.KDSVDLoss()(g, [x + 0.1 for x in g])  # doctest: +SKIP
    """

    function = staticmethod(kdsvd_loss)
    validate = staticmethod(check_kdsvd_options)

    def __init__(self, k: int = 1, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(k=k, reduction=reduction, backend=backend)

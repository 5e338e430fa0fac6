"""Pearson-correlation distillation for detectors: ``pkd_loss`` and ``PKDLoss`` (Cao et al.,
NeurIPS 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.pkd import CORE


def check_pkd_options(loss_weight: float = 1.0, resize_student: bool = True,
                      reduction: str = "mean") -> None:
    _checks.check_positive("loss_weight", loss_weight, inclusive=True)
    _checks.check_flag("resize_student", resize_student)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def resize_to_match(student: torch.Tensor, teacher: torch.Tensor, resize_student: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resize (``F.interpolate``, ``align_corners=False``) of the student to the
    teacher's H x W (``resize_student``) or of the teacher to the student's."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if resize_student:
        return F.interpolate(student, teacher.shape[-2:], mode="bilinear"), teacher
    return student, F.interpolate(teacher, student.shape[-2:], mode="bilinear")


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, loss_weight: float = 1.0,
             resize_student: bool = True, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""PKD: feature imitation through the Pearson correlation (Cao et al., "PKD: General
    Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
    NeurIPS 2022).

    .. math::
        \hat x = \frac{x - \mu_c}{\sigma_c + 10^{-6}},\qquad
        \ell_b = \frac{w}{2\,C H W} \sum_{c,h,w} (\hat s - \hat t)^2_{b,c,h,w}

    with :math:`\mu_c, \sigma_c` the mean and (unbiased) standard deviation of channel c over
    the batch and positions (N, H, W). Per channel this is about
    :math:`1 - r`, r the Pearson correlation of student and teacher (the magnitude of the
    features no longer matters). ``reduction="mean"`` averages over the batch: mmrazor's
    ``PKDLoss`` (``F.mse_loss(ŝ, t̂) / 2 · loss_weight``). The statistics couple the batch:
    ``"none"`` gives each sample's term of that mean under the batch's statistics.
    Defaults follow mmrazor: ``loss_weight=1.0``, ``resize_student=True`` (its
    ``resize_stu``). Where mmrazor compares only H to decide whether to resize, this compares
    H and W. A channel with one value (N·H·W = 1) has no standard deviation: NaN.

    Args:
        student: (N, C, H_s, W_s) student features (e.g. one FPN level, after a connector
            when the channels differ).
        teacher: (N, C, H_t, W_t) teacher features, the same channels.
        loss_weight: factor w >= 0, default 1.0.
        resize_student: when the sizes differ, bilinearly resize the student to the teacher's
            (default True) or the teacher to the student's (False).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (N,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core; ``"native"`` and
            ``"triton"`` raise).

    Example:
        >>> s, t = torch.randn(2, 256, 32, 32), torch.randn(2, 256, 64, 64)
        >>> kdfast.functional.pkd_loss(s, t)  # doctest: +SKIP
    """
    check_pkd_options(loss_weight, resize_student, reduction)
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_batch(student, teacher)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"student has {student.shape[1]} channels but teacher has "
                         f"{teacher.shape[1]}; map the student to the teacher's channels "
                         "first (a 1x1 conv, e.g. kdfast.make_connector)")
    student, teacher = _checks.promote(student, teacher)
    student, teacher = resize_to_match(student, teacher, resize_student)
    core = backends.choose(CORE, backend, student, teacher).fn
    return _checks.reduce(core(student, teacher, float(loss_weight)), reduction)


class PKDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.pkd_loss`; ``forward(student, teacher)``.

    Defaults (mmrazor's ``PKDLoss``): ``loss_weight=1.0``, ``resize_student=True``,
    ``reduction="mean"``.

    Example:
        >>> kdfast.PKDLoss()(torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(pkd_loss)
    validate = staticmethod(check_pkd_options)

    def __init__(self, loss_weight: float = 1.0, resize_student: bool = True,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(loss_weight=loss_weight, resize_student=resize_student,
                         reduction=reduction, backend=backend)

"""Channel-wise distillation for dense prediction: ``cwd_loss`` and ``CWDLoss`` (Shu et al.,
ICCV 2021)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.softmax_kl import CORE
from kdfast.reference.cwd import channel_rows


def check_cwd_options(temperature: float = 1.0, loss_weight: float = 1.0,
                      reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("loss_weight", loss_weight, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
             loss_weight: float = 1.0, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
    Prediction", ICCV 2021).

    .. math::
        \ell_b = w\,\frac{\tau^2}{C} \sum_{c} \sum_{i}
            p_t^{(i)} \left(\log p_t^{(i)} - \log p_s^{(i)}\right),\quad
        p = \operatorname{softmax}_{i \in H\cdot W}\!\big(x_{b,c,i} / \tau\big)

    i.e. each channel's map is a distribution over the H·W positions and the student's is
    pulled to the teacher's by :math:`\tau^2\,\mathrm{KL}(p_t \,\|\, p_s)`, averaged over
    channels; ``reduction="mean"`` averages over the batch, which is mmrazor's
    ``ChannelWiseDivergence`` (:math:`\tau^2 \sum_{b,c} \mathrm{KL} / (B C)`, times
    ``loss_weight``). Defaults are mmrazor's class defaults: ``temperature=1.0`` (its
    ``tau``), ``loss_weight=1.0`` (its distillation configs set 3 to 10 per map, and τ = 1
    or 4).

    Runs on the ``"softmax_kl"`` core with one row per (sample, channel): the maps viewed as
    (B·C, H·W), without a copy when they are contiguous. On CPU the native backward recomputes
    the gradient instead of keeping it from the forward, so forward + backward hold one
    gradient-sized tensor beyond the inputs (segmentation maps are large).

    Args:
        student: (B, C, H, W) student logits (or features), e.g. a segmentation head's output.
        teacher: (B, C, H, W), the same shape.
        temperature: τ > 0, default 1.0.
        loss_weight: factor w >= 0, default 1.0.
        reduction: ``"mean"`` (batch mean, default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``,
            ``"triton"`` or ``"reference"`` for the ``"softmax_kl"`` core.

    Example:
        >>> s, t = torch.randn(2, 19, 64, 128), torch.randn(2, 19, 64, 128)
        >>> kdfast.functional.cwd_loss(s, t, temperature=4.0)  # doctest: +SKIP
    """
    check_cwd_options(temperature, loss_weight, reduction)
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_shape(student, teacher, fix=(
        "map the student to the teacher's channels and size first (a 1x1 conv, "
        "F.interpolate)"))
    student, teacher = _checks.promote(student, teacher)
    rows_s, rows_t = channel_rows(student), channel_rows(teacher)
    core = backends.choose(CORE, backend, rows_s, rows_t).fn
    per_channel = core(rows_s, rows_t, float(temperature))
    if reduction == "mean":  # the batch mean of the channel means: one mean over B·C
        loss = per_channel.mean()
    else:
        per_sample = per_channel.view(student.shape[0], student.shape[1]).mean(dim=1)
        loss = _checks.reduce(per_sample, reduction)
    return loss if float(loss_weight) == 1.0 else float(loss_weight) * loss


class CWDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.cwd_loss`; ``forward(student, teacher)``.

    Defaults (mmrazor's ``ChannelWiseDivergence``): ``temperature=1.0``, ``loss_weight=1.0``,
    ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.CWDLoss(temperature=4.0, loss_weight=3.0)
        >>> loss = criterion(student_seg_logits, teacher_seg_logits.detach())  # doctest: +SKIP
    """

    function = staticmethod(cwd_loss)
    validate = staticmethod(check_cwd_options)

    def __init__(self, temperature: float = 1.0, loss_weight: float = 1.0,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(temperature=temperature, loss_weight=loss_weight, reduction=reduction,
                         backend=backend)

"""Variational information distillation: ``vid_loss`` and ``VIDLoss`` with its trainable
regressor and variance head (Ahn et al., "Variational Information Distillation for Knowledge
Transfer", CVPR 2019)."""

from __future__ import annotations

import torch
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import OptionAttributes
from kdfast.ops.vid import CORE
from kdfast.reference.vid import (
    INIT_VARIANCE,
    VID_EPS,
    scale_for_variance,
    variance_from_scale,
)

FEATURE_NDIMS = (2, 3, 4, 5)


def check_vid_options(reduction: str = "mean") -> None:
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def vid_loss(predicted_mean: torch.Tensor, teacher: torch.Tensor, variance: torch.Tensor, *,
             reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""VID loss (Ahn et al., 2019): the Gaussian negative log-likelihood of the teacher's
    features under the student's prediction, without its constant.

    .. math::
        \ell_b = \frac{1}{C\,HW}\sum_{c,h,w} \frac12\Big(
                 \frac{(\mu_{b,c,h,w} - t_{b,c,h,w})^2}{\sigma_c^2} + \log\sigma_c^2\Big)

    ``reduction="mean"`` (default) is RepDistiller's ``VIDLoss`` (the mean over every entry).
    μ is the student's regressor output and σ²_c a per-channel variance, > 0 (RepDistiller:
    softplus(α_c) + 1e-5; :class:`kdfast.VIDLoss` owns both as trainable parameters and
    calls this).

    Args:
        predicted_mean: (B, C, ...) the regressor's prediction μ.
        teacher: (B, C, ...) teacher features, the shape of ``predicted_mean``.
        variance: (C,) the per-channel variances σ² (not checked to be positive: that would
            read the values).
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> mu, t = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)
        >>> kdfast.functional.vid_loss(mu, t, torch.full((64,), 5.0))  # doctest: +SKIP
    """
    check_vid_options(reduction)
    _checks.check_tensor("predicted_mean", predicted_mean, FEATURE_NDIMS, "(B, C, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, C, ...)")
    _checks.check_tensor("variance", variance, 1, "(C,)")
    _checks.check_same_shape(predicted_mean, teacher, ("predicted_mean", "teacher"),
                             "the regressor must map the student to the teacher's shape")
    if variance.device != teacher.device:
        raise ValueError(f"variance is on {variance.device} but teacher is on "
                         f"{teacher.device}; move both to one device with .to(device)")
    if variance.shape[0] != teacher.shape[1]:
        raise ValueError(f"variance must have one entry per teacher channel, shape "
                         f"({teacher.shape[1]},), got {tuple(variance.shape)}")
    predicted_mean, teacher, variance = _checks.promote(predicted_mean, teacher, variance)
    core = backends.choose(CORE, backend, predicted_mean, teacher, variance).fn
    return _checks.reduce(core(predicted_mean, teacher, variance), reduction)


def check_vid_module_options(eps: float = VID_EPS, pool: bool = True,
                             reduction: str = "mean", backend: str | None = None) -> None:
    _checks.check_positive("eps", eps)
    _checks.check_flag("pool", pool)
    check_vid_options(reduction)
    _checks.check_backend(backend)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class VIDLoss(OptionAttributes, nn.Module):
    """VID with its trainable parts, RepDistiller's ``VIDLoss``: ``forward(student, teacher)``.

    The regressor is conv1x1 → ReLU → conv1x1 → ReLU → conv1x1 (no biases; C_s → C_mid →
    C_mid → C_t) and the variance head one parameter α per teacher channel with
    σ² = softplus(α) + ``eps``, initialised so that σ² = ``init_variance``. The larger of
    the two maps is first average-pooled to the smaller's size (``pool``; RepDistiller pools
    adaptively, here the sizes must be whole multiples), then the student is regressed and
    :func:`kdfast.functional.vid_loss` applied.

    Args:
        student_channels, teacher_channels: C_s and C_t of the (B, C, H, W) features.
        mid_channels: C_mid, default None: C_t (what RepDistiller's training script uses).
        init_variance: the initial σ², > eps, default 5.0 (RepDistiller's ``init_pred_var``).
        eps: the variance floor, > 0, default 1e-5.
        pool: match spatial sizes by average pooling (default True).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``. backend: as for
            :func:`kdfast.functional.vid_loss`.

    The regressor and α are parameters: train them with the student, e.g.
    ``torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=...)``.

    Example:
        >>> loss = kdfast.VIDLoss(32, 64)
        >>> loss(torch.randn(8, 32, 16, 16), torch.randn(8, 64, 8, 8))  # doctest: +SKIP
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 mid_channels: int | None = None, *, init_variance: float = INIT_VARIANCE,
                 eps: float = VID_EPS, pool: bool = True, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__()
        student_channels = _checks.check_int("student_channels", student_channels)
        teacher_channels = _checks.check_int("teacher_channels", teacher_channels)
        mid_channels = teacher_channels if mid_channels is None else _checks.check_int(
            "mid_channels", mid_channels)
        self._set_options(eps=eps, pool=pool, reduction=reduction, backend=backend)
        if not _checks.check_real("init_variance", init_variance) > eps:
            raise ValueError(f"init_variance must be > eps ({eps}), got {init_variance}")
        self.regressor = nn.Sequential(
            _conv1x1(student_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, mid_channels), nn.ReLU(),
            _conv1x1(mid_channels, teacher_channels))
        self.log_scale = nn.Parameter(
            torch.full((teacher_channels,), scale_for_variance(float(init_variance), eps)))

    def _check_options(self, options: dict) -> None:
        check_vid_module_options(**options)

    def variance(self) -> torch.Tensor:
        """σ² per teacher channel, (C_t,): softplus(α) + eps."""
        return variance_from_scale(self.log_scale, self.eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _checks.check_features("student", student)
        _checks.check_features("teacher", teacher)
        _checks.check_same_batch(student, teacher)
        student, teacher = _checks.match_spatial(student, teacher, self.pool)
        return vid_loss(self.regressor(student), teacher, self.variance(),
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self._option_values().items())

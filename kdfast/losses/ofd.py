"""Overhaul of feature distillation: ``ofd_loss``, ``ofd_margin`` and ``OFDLoss`` (Heo et
al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.ofd import CORE
from kdfast.reference.ofd import margin_from_batchnorm


def check_ofd_options(reduction: str = "mean") -> None:
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def ofd_margin(batchnorm: nn.Module) -> torch.Tensor:
    r"""The margins (C,) of OFD from the teacher's BatchNorm before a ReLU (detached).

    With :math:`m_c` = ``bias[c]`` and :math:`s_c` = ``|weight[c]|`` the margin is the mean of
    the negative part of :math:`\mathcal N(m_c, s_c^2)`,
    :math:`m - s\,\varphi(m/s) / \Phi(-m/s)`, or :math:`-3 s` where
    :math:`\Phi(-m/s) \le 0.001` (``get_margin_from_BN`` of the authors' code).

    Example:
        >>> kdfast.functional.ofd_margin(torch.nn.BatchNorm2d(64)).shape
        torch.Size([64])
    """
    if not isinstance(batchnorm, nn.modules.batchnorm._BatchNorm):
        raise TypeError("batchnorm must be a torch.nn.BatchNorm2d (the teacher's BatchNorm "
                        f"before the ReLU), got {type(batchnorm).__name__}")
    if batchnorm.weight is None or batchnorm.bias is None:
        raise ValueError("batchnorm has no affine weight and bias (affine=False); OFD's "
                         "margins need them: pass a BatchNorm built with affine=True")
    return margin_from_batchnorm(batchnorm.weight, batchnorm.bias)


def ofd_loss(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor, *,
             reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""OFD partial L2 distance (Heo et al., 2019) against the teacher's margins.

    .. math::
        \hat t = \max(t, m_c),\qquad
        \ell_b = \sum_{c,h,w} \mathbb 1[s > \hat t \ \lor\ \hat t > 0]\,(s - \hat t)^2

    with :math:`s` the student's features after the connector (conv1x1 + BN, see
    :class:`kdfast.OFDLoss`), :math:`t` the teacher's pre-ReLU features (detached) and
    :math:`m` the margin of :func:`ofd_margin`. ``reduction="mean"`` is the authors'
    ``loss.sum() / batch_size``; their training scripts then weight it by 1/1000 (CIFAR-100)
    or 1/10000 (ImageNet), and several stages by 1/2^(n-1-i) (stage i of n): weight the terms
    yourself (e.g. in a :class:`kdfast.Term`).

    Args:
        student: (B, C, H, W) student features mapped to the teacher's channels.
        teacher: (B, C, H, W) teacher features before the ReLU.
        margin: (C,) per-channel margins, usually ``ofd_margin(teacher_bn)``.
        reduction: ``"mean"`` (default) | ``"sum"`` over the batch, ``"none"`` for (B,).
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> bn = torch.nn.BatchNorm2d(64)
        >>> s, t = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)
        >>> kdfast.functional.ofd_loss(s, t, kdfast.functional.ofd_margin(bn))  # doctest: +SKIP
    """
    check_ofd_options(reduction)
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_shape(student, teacher, fix="map the student to the teacher's "
                             "channels with a connector (kdfast.OFDLoss has one)")
    _checks.check_tensor("margin", margin, 1, "(C,)")
    if margin.device != teacher.device:
        raise ValueError(f"margin is on {margin.device} but teacher is on {teacher.device}; "
                         "move it with margin.to(device)")
    if margin.shape[0] != teacher.shape[1]:
        raise ValueError(f"margin has {margin.shape[0]} entries but teacher has "
                         f"{teacher.shape[1]} channels; compute it from the BatchNorm of this "
                         "teacher stage (kdfast.functional.ofd_margin)")
    student, teacher, margin = _checks.promote(student, teacher, margin)
    per_sample = backends.choose(CORE, backend, student, teacher).fn(student, teacher, margin)
    return _checks.reduce(per_sample, reduction)


def make_ofd_connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """OFD's connector: 1x1 conv without bias + BatchNorm, initialised as the authors do
    (conv weights N(0, 2 / C_t), BN weight 1 and bias 0)."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


class OFDLoss(FunctionalLoss):
    """OFD for one stage: the margins of a teacher BatchNorm and a trainable connector,
    :func:`kdfast.functional.ofd_loss`.

    ``forward(student, teacher)`` = ``ofd_loss(connector(student), teacher, margin)``.

    Args:
        teacher_bn: the teacher's BatchNorm2d before the ReLU of this stage; its margins are
            computed once, here (``ofd_margin``), and kept in the buffer ``margin``.
        student_channels: channels of the student's pre-ReLU features; builds
            ``self.connector`` (:func:`make_ofd_connector`, to the teacher's channels). Default
            None: no connector (the student already has the teacher's shape).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``. backend: default None.

    Train the connector with the student (give ``loss.parameters()`` to the optimiser).

    Example:
        >>> bn = torch.nn.BatchNorm2d(64)
        >>> loss = kdfast.OFDLoss(bn, student_channels=32)
        >>> loss(torch.randn(8, 32, 8, 8), torch.randn(8, 64, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(ofd_loss)
    validate = staticmethod(check_ofd_options)

    def __init__(self, teacher_bn: nn.Module, student_channels: int | None = None, *,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(reduction=reduction, backend=backend)
        margin = ofd_margin(teacher_bn)
        self.register_buffer("margin", margin.clone())
        if student_channels is not None and (not isinstance(student_channels, int)
                                             or isinstance(student_channels, bool)
                                             or student_channels < 1):
            raise ValueError(f"student_channels must be a positive int, got "
                             f"{student_channels!r}")
        self.connector = (None if student_channels is None
                          else make_ofd_connector(student_channels, margin.shape[0]))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.connector is not None:
            _checks.check_features("student", student)
            student = self.connector(student)
        return ofd_loss(student, teacher, self.margin, **self._option_values())

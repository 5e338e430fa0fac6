"""Activation-boundary distillation: ``ab_loss`` and ``ABLoss`` (Heo et al., "Knowledge
Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons", AAAI 2019)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdfast import _checks, backends
from kdfast.losses.fitnet import ConnectorLoss, apply_connector, make_connector
from kdfast.ops.ab import CORE

NAMES = ("student_preact", "teacher_preact")


def check_ab_options(margin: float = 1.0, pool: bool = True, reduction: str = "mean") -> None:
    _checks.check_positive("margin", margin)
    _checks.check_flag("pool", pool)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def ab_loss(student_preact: torch.Tensor, teacher_preact: torch.Tensor, *,
            margin: float = 1.0, connector: Callable | None = None, pool: bool = True,
            reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""Activation-boundary loss (Heo et al., 2019), the alternative L2 loss of the paper.

    .. math::
        \ell_b = \sum_{c,h,w} (s+\mu)^2\,1[s > -\mu \wedge t \le 0]
                 + (s-\mu)^2\,1[s \le \mu \wedge t > 0]

    on pre-ReLU features, :math:`s` the student's after ``connector``. ``reduction="mean"``
    (default) divides the batch sum by B. (RepDistiller also divides by 1000 and weights the
    layers; use a loss weight for that.) The teacher only selects the branch: no gradient.

    Args:
        student_preact: (B, C_s, H_s, W_s) student features before the ReLU.
        teacher_preact: (B, C_t, H_t, W_t) teacher features before the ReLU.
        margin: mu > 0, default 1.0.
        connector: callable applied to the student first (e.g. a 1x1 conv + BN, what
            :class:`ABLoss` builds); needed when C_s != C_t. Default None.
        pool: average-pool the larger map to the smaller when H, W differ (default True);
            with False a mismatch raises.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s, t = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)
        >>> kdfast.functional.ab_loss(s, t, margin=1.0)  # doctest: +SKIP
    """
    check_ab_options(margin, pool, reduction)
    _checks.check_features(NAMES[0], student_preact)
    _checks.check_features(NAMES[1], teacher_preact)
    _checks.check_same_batch(student_preact, teacher_preact, NAMES)
    student = apply_connector(NAMES[0], student_preact, connector)
    _checks.check_features(f"connector({NAMES[0]})", student)
    if student.shape[1] != teacher_preact.shape[1]:
        raise ValueError(f"{NAMES[0]} has {student.shape[1]} channels"
                         f"{' after the connector' if connector is not None else ''} but "
                         f"{NAMES[1]} has {teacher_preact.shape[1]}; pass connector= (a 1x1 "
                         "conv + BN to the teacher's channels, e.g. kdfast.make_connector("
                         "C_s, C_t, relu=False)) or use kdfast.ABLoss(student_channels=..., "
                         "teacher_channels=...)")
    student, teacher = _checks.promote(student, teacher_preact)
    student, teacher = _checks.match_spatial(student, teacher, pool, NAMES)
    core = backends.choose(CORE, backend, student, teacher).fn
    return _checks.reduce(core(student, teacher, float(margin)), reduction)


class ABLoss(ConnectorLoss):
    """Module form of :func:`kdfast.functional.ab_loss`; ``forward(student_preact,
    teacher_preact)``.

    Args:
        margin: mu > 0, default 1.0.
        student_channels, teacher_channels: when given and different, ``self.connector`` is
            a trainable 1x1 conv + BatchNorm (no ReLU) mapping the student's channels to the
            teacher's (RepDistiller's Connector). Default None: no connector.
        pool, reduction, backend: as in :func:`kdfast.functional.ab_loss` (defaults True,
            ``"mean"``, None).

    Train ``loss.parameters()`` (the connector) with the student. ``margin``, ``pool``,
    ``reduction`` and ``backend`` are attributes, checked on assignment.

    Example:
        >>> loss = kdfast.ABLoss(student_channels=32, teacher_channels=64)
        >>> loss(torch.randn(4, 32, 8, 8), torch.randn(4, 64, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(ab_loss)
    validate = staticmethod(check_ab_options)

    def __init__(self, margin: float = 1.0, student_channels: int | None = None,
                 teacher_channels: int | None = None, pool: bool = True,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(margin=margin, pool=pool, reduction=reduction, backend=backend)
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("pass both student_channels and teacher_channels or neither")
        self.connector = self.connector_spec = None
        if student_channels is not None and student_channels != teacher_channels:
            self._set_connector(student_channels, teacher_channels)

    def build_connector(self, student_shape, teacher_shape) -> bool:
        """Creates the 1x1 conv + BN connector from observed (B, C, H, W) shapes when there is
        none and the channels differ (what :meth:`kdfast.Distiller.build` calls)."""
        if self.connector is not None or student_shape[1] == teacher_shape[1]:
            return False
        self._set_connector(student_shape[1], teacher_shape[1])
        return True

    def _new_connector(self, student, teacher) -> nn.Module:
        return make_connector(student, teacher, relu=False)

    def forward(self, student_preact: torch.Tensor, teacher_preact: torch.Tensor
                ) -> torch.Tensor:
        return ab_loss(student_preact, teacher_preact, connector=self.connector,
                       **self._option_values())

"""KD with conditional adversarial networks (Xu, Hsu & Huang, 2018): the label-conditioned
discriminator on logits, its loss and the student's loss. The alternating-step driver
``AdversarialKD`` lives in :mod:`kdfast.recipes`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdfast import _checks
from kdfast.losses.kd import check_logit_pair
from kdfast.reference import adversarial as reference
from kdfast.reference.adversarial import GAN_KINDS


def check_adversarial_options(kind: str = "lsgan", l1_weight: float = 1.0,
                              reduction: str = "mean") -> None:
    _checks.check_choice("kind", kind, GAN_KINDS)
    _checks.check_positive("l1_weight", l1_weight, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


class ConditionalDiscriminator(nn.Module):
    """MLP discriminator on logits conditioned on the label (Xu, Hsu & Huang, 2018).

    Input: the logits concatenated with the one-hot label, (B, 2 * num_classes); output: one
    raw score per sample, (B,) (no sigmoid: the losses take raw scores). ``depth`` linear
    layers, ``hidden`` units each, LeakyReLU(0.2) between them (``depth=1`` is a linear
    score). Defaults ``hidden=256``, ``depth=3`` are kdfast's choice for logits of tens to
    thousands of classes, not numbers from the paper.

    Example:
        >>> D = kdfast.ConditionalDiscriminator(num_classes=100)
        >>> scores = D(logits, labels)  # (B,)  # doctest: +SKIP
    """

    def __init__(self, num_classes: int, hidden: int = 256, depth: int = 3,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _checks.check_positive("negative_slope", negative_slope, inclusive=True)
        self.num_classes = num_classes
        widths = [2 * num_classes] + [hidden] * (depth - 1) + [1]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i:
                layers.append(nn.LeakyReLU(negative_slope))
            layers.append(nn.Linear(fan_in, fan_out))
        self.net = nn.Sequential(*layers)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _checks.check_logits("logits", logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes but the discriminator was "
                             f"built for num_classes={self.num_classes}")
        labels = _checks.check_labels("labels", labels, logits.shape[0], self.num_classes,
                                      logits.device)
        return self.net(reference.condition(logits, labels)).squeeze(1)


def _validated(student_logits, teacher_logits, labels
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits in their promoted dtype (what the discriminator sees) and the labels."""
    check_logit_pair(student_logits, teacher_logits)
    batch, num_classes = student_logits.shape
    labels = _checks.check_labels("labels", labels, batch, num_classes, student_logits.device)
    return (*_checks.promote(student_logits, teacher_logits), labels)


def _checked_scores(discriminator: Callable, batch: int) -> Callable:
    """``discriminator`` whose output must be one score per sample, (B,) or (B, 1)."""
    if not callable(discriminator):
        raise TypeError(f"discriminator must be a module or callable (logits, labels) -> "
                        f"scores, got {type(discriminator).__name__}")

    def scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = discriminator(logits, labels)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) not in ((batch,), (batch, 1)):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"discriminator must return one score per sample, shape ({batch},)"
                             f" or ({batch}, 1), got {shape}")
        return out.reshape(batch)

    return scores


def _without_parameter_grads(discriminator: Callable) -> Callable:
    """``discriminator`` called with its parameters detached: the graph reaches its inputs but
    none of its parameters (no flag flipping, so it traces under ``torch.compile``)."""
    if not isinstance(discriminator, nn.Module):
        return discriminator
    detached = {name: p.detach() for name, p in discriminator.named_parameters()}
    return lambda *args: torch.func.functional_call(discriminator, detached, args)


def discriminator_loss(discriminator: Callable, student_logits: torch.Tensor,
                       teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                       kind: str = "lsgan", reduction: str = "mean") -> torch.Tensor:
    r"""Loss of the conditional discriminator: teacher logits real, student logits fake.

    ``kind="lsgan"`` (default): :math:`\tfrac12 (D(z_t, y) - 1)^2 + \tfrac12 D(z_s, y)^2`;
    ``kind="bce"``: :math:`-\log\sigma(D(z_t, y)) - \log(1 - \sigma(D(z_s, y)))`, per sample,
    then ``reduction`` over the batch. Both logits are **detached**: backward reaches the
    discriminator's parameters only. The discriminator sees both logits in their promoted
    dtype (the dtype rule of every loss), so its parameters must have that dtype (or run it
    under ``torch.autocast``).

    Args:
        discriminator: ``D(logits, labels) -> (B,)`` raw scores, e.g.
            :class:`ConditionalDiscriminator`.
        student_logits, teacher_logits: (B, num_classes), same shape and device.
        labels: (B,) integer class indices in [0, num_classes).
        kind: ``"lsgan"`` | ``"bce"``. reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Example:
        >>> d_loss = kdfast.functional.discriminator_loss(D, z_s, z_t, y)  # doctest: +SKIP
    """
    check_adversarial_options(kind, reduction=reduction)
    student_logits, teacher_logits, labels = _validated(student_logits, teacher_logits, labels)
    scores = _checked_scores(discriminator, student_logits.shape[0])
    per_sample = reference.discriminator_loss(scores, student_logits, teacher_logits, labels,
                                              kind)
    return _checks.reduce(per_sample, reduction)


def adversarial_student_loss(discriminator: Callable, student_logits: torch.Tensor,
                             teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                             kind: str = "lsgan", l1_weight: float = 1.0,
                             reduction: str = "mean") -> torch.Tensor:
    r"""The student's loss: fool the conditional discriminator and match the teacher's logits.

    .. math::
        \ell_b = g\big(D(z_s, y)\big) + \lambda\,\tfrac1C \lVert z_s - z_t\rVert_1

    with :math:`g(d) = \tfrac12 (d - 1)^2` for ``kind="lsgan"`` (default) or
    :math:`-\log\sigma(d)` for ``"bce"``; the L1 term is the **mean** over the C classes of
    :math:`|z_s - z_t|` per sample (``F.l1_loss``'s convention), then ``reduction`` over the
    batch. Default :math:`\lambda` = ``l1_weight=1.0`` (kdfast's choice; the paper tunes the
    balance per data set). The teacher is detached, and the discriminator's parameters get
    **no gradient** from this loss (only the student does). Add the label cross-entropy
    yourself if you want it. As in :func:`discriminator_loss`, the discriminator sees the
    logits in their promoted dtype.

    Args:
        discriminator: ``D(logits, labels) -> (B,)`` raw scores.
        student_logits, teacher_logits: (B, num_classes), same shape and device.
        labels: (B,) integer class indices. kind: ``"lsgan"`` | ``"bce"``.
        l1_weight: lambda >= 0, default 1.0. reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Example:
        >>> loss = kdfast.functional.adversarial_student_loss(D, z_s, z_t, y)  # doctest: +SKIP
    """
    check_adversarial_options(kind, l1_weight, reduction)
    student_logits, teacher_logits, labels = _validated(student_logits, teacher_logits, labels)
    scores = _checked_scores(_without_parameter_grads(discriminator), student_logits.shape[0])
    per_sample = reference.adversarial_student_loss(scores, student_logits, teacher_logits,
                                                    labels, kind, float(l1_weight))
    return _checks.reduce(per_sample, reduction)

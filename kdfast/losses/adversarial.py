"""KD with conditional adversarial networks (Xu, Hsu & Huang, 2018): the label-conditioned
discriminator on logits, its loss, the student's loss and the alternating-step helper."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdfast import _checks
from kdfast.losses._module import OptionAttributes
from kdfast.losses.kd import check_logit_pair
from kdfast.reference import adversarial as reference
from kdfast.reference.adversarial import GAN_KINDS


def check_adversarial_options(kind: str = "lsgan", l1_weight: float = 1.0,
                              reduction: str = "mean") -> None:
    _checks.check_choice("kind", kind, GAN_KINDS)
    _checks.check_positive("l1_weight", l1_weight, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def check_discriminator_steps(discriminator_steps: int) -> None:
    if isinstance(discriminator_steps, bool) or not isinstance(discriminator_steps, int) \
            or discriminator_steps < 1:
        raise ValueError(f"discriminator_steps must be a positive int, got "
                         f"{discriminator_steps!r}")


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


class AdversarialKD(OptionAttributes, nn.Module):
    """Alternating steps of KD with a conditional adversarial network.

    Holds the discriminator and its optimizer. ``step(student_logits, teacher_logits,
    labels)`` first runs ``discriminator_steps`` updates of the discriminator on
    :func:`discriminator_loss` (student and teacher detached: no gradient reaches the student),
    then returns :func:`adversarial_student_loss` under the updated discriminator, for the
    caller to add to its objective, backward and step the student's optimizer with.

    Args:
        discriminator: e.g. ``ConditionalDiscriminator(num_classes)``.
        optimizer: the discriminator's optimizer; default
            ``Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))`` (the usual GAN
            setting).
        kind: ``"lsgan"`` (default) | ``"bce"``. l1_weight: default 1.0.
        discriminator_steps: D updates per call, default 1.

    Attributes:
        kind, l1_weight, discriminator_steps: the options, checked on assignment.
        last_discriminator_loss: the (detached) D loss of the last update.

    Example:
        >>> adv = kdfast.AdversarialKD(kdfast.ConditionalDiscriminator(100))
        >>> z_s = student(x)
        >>> with torch.no_grad():
        ...     z_t = teacher(x)
        >>> loss = F.cross_entropy(z_s, y) + adv.step(z_s, z_t, y)
        >>> opt.zero_grad(); loss.backward(); opt.step()  # doctest: +SKIP
    """

    def __init__(self, discriminator: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, kind: str = "lsgan", l1_weight: float = 1.0,
                 discriminator_steps: int = 1) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got "
                            f"{type(discriminator).__name__}")
        self._set_options(kind=kind, l1_weight=l1_weight,
                          discriminator_steps=discriminator_steps)
        self.discriminator = discriminator
        self.optimizer = optimizer or torch.optim.Adam(discriminator.parameters(), lr=2e-4,
                                                       betas=(0.5, 0.999))
        self.last_discriminator_loss: torch.Tensor | None = None

    def _check_options(self, options: dict) -> None:
        check_adversarial_options(options["kind"], options["l1_weight"])
        check_discriminator_steps(options["discriminator_steps"])

    def discriminator_step(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        """One update of the discriminator; returns its loss before the update (detached)."""
        loss = discriminator_loss(self.discriminator, student_logits, teacher_logits, labels,
                                  kind=self.kind)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.last_discriminator_loss = loss.detach()
        return self.last_discriminator_loss

    def student_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        return adversarial_student_loss(self.discriminator, student_logits, teacher_logits,
                                        labels, kind=self.kind, l1_weight=self.l1_weight)

    def step(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """D update(s), then the student's loss (a scalar with a graph to the student)."""
        for _ in range(self.discriminator_steps):
            self.discriminator_step(student_logits, teacher_logits, labels)
        return self.student_loss(student_logits, teacher_logits, labels)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return self.step(student_logits, teacher_logits, labels)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, l1_weight={self.l1_weight}, "
                f"discriminator_steps={self.discriminator_steps}")

"""Weighted soft labels: ``wsld_loss`` and ``WSLDLoss`` (Zhou et al., "Rethinking Soft Labels
for Knowledge Distillation: A Bias-Variance Tradeoff Perspective", ICLR 2021)."""

from __future__ import annotations

import torch

from kdfast import _checks
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair, kd_per_sample
from kdfast.reference.wsld import sample_weights, softened_entropy


def check_wsld_options(temperature: float = 1.0, reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              targets: torch.Tensor, *, temperature: float = 1.0, reduction: str = "mean",
              backend: str | None = None) -> torch.Tensor:
    r"""Weighted soft-label distillation (Zhou et al., ICLR 2021).

    .. math::
        w_b = 1 - \exp\!\Big(-\max\Big(\frac{\mathrm{CE}(s_b, y_b)}
              {\mathrm{CE}(t_b, y_b) + 10^{-7}}, 0\Big)\Big),\qquad
        \ell_b = w_b\, T^2\, H(p_t, p_s),\quad p = \operatorname{softmax}(z / T)

    with the label cross-entropies at temperature 1 on detached logits (w is a constant of
    the gradient), as mmrazor's ``WSLD`` and the paper's code compute it; H is the soft
    cross-entropy −Σ p_t log p_s. ``temperature=1.0`` is mmrazor's default (its ImageNet config
    uses T = 2 and a loss weight of 2.5: pass the temperature, scale the loss).
    mmrazor's ``num_classes`` is the logits' width here. ``reduction="mean"`` is the batch mean
    (mmrazor's).

    Computed as H(p_t, p_s) = KL(p_t ‖ p_s) + H(p_t): the KL on the fused ``"softmax_kl"``
    core, the teacher's entropy and the weights (label cross-entropies) in PyTorch. The
    teacher is not detached (its gradient is that of the cross-entropy).

    Args:
        student_logits: (B, num_classes) logits.
        teacher_logits: (B, num_classes), same shape and device.
        targets: (B,) integer class indices.
        temperature: T > 0, default 1.0.
        reduction: ``"mean"`` (batch mean, default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: the backend of the ``"softmax_kl"`` core (the policy of
            :func:`kdfast.functional.kd_loss`).

    Example:
        >>> s, t, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(100, (8,))
        >>> 2.5 * kdfast.functional.wsld_loss(s, t, y, temperature=2.0)  # doctest: +SKIP
    """
    check_wsld_options(temperature, reduction)
    check_logit_pair(student_logits, teacher_logits)
    student_logits, teacher_logits = _checks.promote(student_logits, teacher_logits)
    batch, num_classes = student_logits.shape
    targets = _checks.check_labels("targets", targets, batch, num_classes,
                                   student_logits.device)
    temperature = float(temperature)
    soft_cross_entropy = (kd_per_sample(student_logits, teacher_logits, temperature, backend)
                          + softened_entropy(teacher_logits, temperature))
    weights = sample_weights(student_logits, teacher_logits, targets)
    return _checks.reduce(weights * soft_cross_entropy, reduction)


class WSLDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.wsld_loss`; ``forward(student_logits,
    teacher_logits, targets)``.

    Defaults (mmrazor): ``temperature=1.0``, ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.WSLDLoss(temperature=2.0)
        >>> loss = 2.5 * criterion(student(x), teacher(x).detach(), y)  # doctest: +SKIP
    """

    function = staticmethod(wsld_loss)
    validate = staticmethod(check_wsld_options)

    def __init__(self, temperature: float = 1.0, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

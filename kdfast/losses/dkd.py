"""Decoupled knowledge distillation: ``dkd_loss`` and ``DKDLoss`` (Zhao et al., "Decoupled
Knowledge Distillation", CVPR 2022)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair
from kdfast.ops.dkd import fused_dkd_applies, native_dkd
from kdfast.ops.softmax_kl import CORE
from kdfast.reference.dkd import tckd, without_gold


def check_dkd_options(temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                      warmup_factor: float = 1.0, reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("alpha", alpha, inclusive=True)
    _checks.check_positive("beta", beta, inclusive=True)
    _checks.check_positive("warmup_factor", warmup_factor, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             targets: torch.Tensor, *, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0, warmup_factor: float = 1.0, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""Decoupled KD (Zhao et al., CVPR 2022): target-class and non-target-class KD.

    With :math:`p = \operatorname{softmax}(z / T)`, g the sample's label,
    :math:`b = (p_g, 1 - p_g)` and :math:`\hat p` the softmax over the non-gold classes only:

    .. math::
        \ell_b = w \left(\alpha\, T^2\,\mathrm{KL}(b_t \,\|\, b_s)
                 + \beta\, T^2\,\mathrm{KL}(\hat p_t \,\|\, \hat p_s)\right)

    (TCKD and NCKD), ``reduction="mean"`` averaging over the batch. Defaults follow mdistiller's
    ``dkd_loss`` and its CIFAR-100 config (mmrazor's ``DKDLoss`` has the same): ``alpha=1``,
    ``beta=8``, ``temperature=4``; the paper's formula is the same. The cross-entropy to the
    labels that mdistiller's ``DKD`` distiller adds is not included (add
    ``F.cross_entropy(student_logits, targets)`` yourself).

    ``warmup_factor`` is w: mdistiller multiplies the loss by ``min(epoch / warmup, 1)``
    (warmup = 20 epochs); pass that value here each epoch (the default 1.0 is "warmed up").
    The loss keeps no state.

    NCKD is the ``"softmax_kl"`` core with the gold column at −inf in both rows (probability
    0, gradient 0): the exact limit of mdistiller's ``z/T − 1000·gold`` trick, equal to it up
    to rounding for ordinary logits. TCKD is computed in log space (exact log(1 − p_g) for a
    confident teacher, where the peers' log of a summed softmax gives −inf). On the native
    CPU backend with a frozen teacher both run in one pass per row (``kdfast::dkd``: the gold
    column masked inside the pass, TCKD from NCKD's normalisers, the combined gradient kept
    from the forward); otherwise the core runs on masked copies and TCKD (two numbers per
    sample) is reference code. The teacher is not detached: run it under
    ``torch.no_grad()``.

    Args:
        student_logits: (B, num_classes) logits, num_classes >= 2.
        teacher_logits: (B, num_classes), same shape and device.
        targets: (B,) integer class indices (the gold classes).
        temperature: T > 0, default 4.0.
        alpha: weight of TCKD, >= 0, default 1.0. beta: weight of NCKD, >= 0, default 8.0.
        warmup_factor: w >= 0 multiplying the whole loss, default 1.0.
        reduction: ``"mean"`` (batch mean, default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: the backend of the ``"softmax_kl"`` core (the policy of
            :func:`kdfast.functional.kd_loss`); ``"native"`` on CPU tensors runs the fused
            DKD pass above.

    Example:
        >>> s, t, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(100, (8,))
        >>> epoch = 5
        >>> warmup = min(epoch / 20, 1.0)  # mdistiller's DKD.WARMUP = 20
        >>> kdfast.functional.dkd_loss(s, t, y, warmup_factor=warmup)  # doctest: +SKIP
    """
    check_dkd_options(temperature, alpha, beta, warmup_factor, reduction)
    check_logit_pair(student_logits, teacher_logits)
    student_logits, teacher_logits = _checks.promote(student_logits, teacher_logits)
    batch, num_classes = student_logits.shape
    _checks.check_min_classes("student_logits", student_logits, 2,
                              "DKD (the gold class and the others)")
    targets = _checks.check_labels("targets", targets, batch, num_classes,
                                   student_logits.device)
    temperature = float(temperature)
    core = backends.choose(CORE, backend, student_logits, teacher_logits)
    if core.backend == "native" and fused_dkd_applies(student_logits, teacher_logits):
        weight = float(warmup_factor)
        return _checks.reduce(native_dkd(student_logits, teacher_logits, targets, temperature,
                                         weight * float(alpha), weight * float(beta)),
                              reduction)
    student_others = without_gold(student_logits, targets)
    teacher_others = without_gold(teacher_logits, targets)
    non_target = core.fn(student_others, teacher_others, temperature)
    target = tckd(student_logits, teacher_logits, student_others, teacher_others, targets,
                  temperature)
    per_sample = float(warmup_factor) * (float(alpha) * target + float(beta) * non_target)
    return _checks.reduce(per_sample, reduction)


class DKDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.dkd_loss`; ``forward(student_logits,
    teacher_logits, targets)``.

    Defaults (mdistiller): ``temperature=4.0``, ``alpha=1.0``, ``beta=8.0``,
    ``warmup_factor=1.0`` (set ``criterion.warmup_factor = min(epoch / 20, 1.0)`` each epoch
    for mdistiller's warm-up), ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.DKDLoss()
        >>> loss = criterion(student(x), teacher(x).detach(), y)  # doctest: +SKIP
    """

    function = staticmethod(dkd_loss)
    validate = staticmethod(check_dkd_options)

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                 warmup_factor: float = 1.0, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, alpha=alpha, beta=beta,
                         warmup_factor=warmup_factor, reduction=reduction, backend=backend)

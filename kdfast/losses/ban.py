"""Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, ICML 2018):
``ban_generation_loss``. The generation driver ``BornAgain`` and ``BornAgainEnsemble`` live
in :mod:`kdfast.recipes`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast import _checks
from kdfast.losses.kd import check_logit_pair, kd_per_sample


def check_ban_options(temperature: float = 1.0, label_weight: float = 0.0,
                      reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("label_weight", label_weight, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def ban_generation_loss(student_logits: torch.Tensor, previous_logits: torch.Tensor,
                        targets: torch.Tensor | None = None, *, temperature: float = 1.0,
                        label_weight: float = 0.0, reduction: str = "mean",
                        backend: str | None = None) -> torch.Tensor:
    r"""Loss of born-again generation k, taught by the frozen generation k-1.

    .. math::
        \ell_b = T^2\,\mathrm{KL}\big(p_{k-1} \,\|\, p_k\big)
                 + \lambda\,\mathrm{CE}(z_k, y_b),\quad p = \operatorname{softmax}(z / T)

    The KL term is :func:`kd_loss` with the previous generation's logits detached; it differs
    from the paper's cross-entropy to the teacher's soft targets only by the teacher's entropy,
    a constant (so the gradient is the same and identical outputs give 0). The paper trains
    with the teacher's outputs only (``label_weight=0``, the default); ``label_weight > 0`` adds
    the usual cross-entropy to the labels (then ``targets`` is required; with
    ``label_weight=0`` it is validated but unused).

    Args:
        student_logits: (B, num_classes) logits of generation k.
        previous_logits: (B, num_classes) logits of generation k-1 (detached here).
        targets: optional (B,) integer class indices.
        temperature: T > 0, default 1.0. label_weight: lambda >= 0, default 0.0.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` / ``"auto"`` / ``"native"`` / ``"triton"`` / ``"reference"`` (the
            policy of :func:`kd_loss`, on its fused core).

    Example:
        >>> z_k, z_prev, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
        >>> F = kdfast.functional
        >>> F.ban_generation_loss(z_k, z_prev, y, label_weight=1.0)  # doctest: +SKIP
    """
    check_ban_options(temperature, label_weight, reduction)
    check_logit_pair(student_logits, previous_logits, ("student_logits", "previous_logits"))
    if targets is None and label_weight > 0:
        raise ValueError(f"label_weight={label_weight} needs targets (the (B,) class indices); "
                         "pass targets or set label_weight=0")
    student_logits, previous_logits = _checks.promote(student_logits, previous_logits)
    per_sample = kd_per_sample(student_logits, previous_logits.detach(), float(temperature),
                               backend)
    if targets is not None:
        batch, num_classes = student_logits.shape
        targets = _checks.check_labels("targets", targets, batch, num_classes,
                                       student_logits.device)
        if label_weight > 0:
            ce = F.cross_entropy(student_logits, targets, reduction="none")
            per_sample = per_sample + float(label_weight) * ce
    return _checks.reduce(per_sample, reduction)

"""DIST: ``dist_loss`` and ``DISTLoss`` (Huang et al., "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022)."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair
from kdfast.ops.dist import CORE
from kdfast.reference.dist import COSINE_EPS


def check_dist_options(temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                       eps: float = COSINE_EPS, reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("beta", beta, inclusive=True)
    _checks.check_positive("gamma", gamma, inclusive=True)
    _checks.check_positive("eps", eps)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
              eps: float = COSINE_EPS, reduction: str = "mean",
              backend: str | None = None) -> torch.Tensor:
    r"""DIST (Huang et al., NeurIPS 2022): match the teacher's class relations by correlation.

    With :math:`Y = \operatorname{softmax}(Z / \tau)` row-wise for the (B, C) logits and
    :math:`\rho` the Pearson correlation (cosine of the mean-centred vectors):

    .. math::
        \mathcal L = \tau^2 \Big(\beta \big(1 - \tfrac1B \textstyle\sum_b
                     \rho(Y^s_{b,:}, Y^t_{b,:})\big)
                     + \gamma \big(1 - \tfrac1C \textstyle\sum_c
                     \rho(Y^s_{:,c}, Y^t_{:,c})\big)\Big)

    the inter-class (per-sample rows) and intra-class (per-class columns, across the batch)
    relations. Defaults follow torchdistill's ``DISTLoss`` and mmrazor's (inter/intra weights
    1, τ = 1): ``beta=1.0``, ``gamma=1.0``, ``temperature=1.0``, ``eps=1e-8`` (the cosine's,
    each norm clamped to at least eps as ``F.cosine_similarity`` does, torchdistill's; mmrazor
    adds eps to the product of the norms, a relative difference of about eps/‖·‖²). mmrazor's
    ImageNet config keeps these and weights the loss by 2: scale the result. The teacher is
    not detached (torchdistill; mmrazor detaches it by default): run it under
    ``torch.no_grad()``.

    ``reduction="mean"`` gives the loss above; ``"sum"`` and ``"none"`` act on the (B,)
    per-sample values τ²(β(1 − ρ_b) + γ·intra), whose mean is the loss: the intra-class term
    is a batch statistic, shared by every sample. Reference code on every backend (row-wise
    dot products; no fused core, see :mod:`kdfast.ops.dist`).

    Args:
        student_logits: (B, num_classes) logits, B >= 2.
        teacher_logits: (B, num_classes), same shape and device.
        temperature: τ > 0, default 1.0.
        beta: inter-class weight >= 0, default 1.0. gamma: intra-class weight >= 0,
            default 1.0.
        eps: > 0, the cosine's clamp, default 1e-8.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``, see above.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s, t = torch.randn(32, 100), torch.randn(32, 100)
        >>> 2.0 * kdfast.functional.dist_loss(s, t)  # doctest: +SKIP
    """
    check_dist_options(temperature, beta, gamma, eps, reduction)
    check_logit_pair(student_logits, teacher_logits)
    student_logits, teacher_logits = _checks.promote(student_logits, teacher_logits)
    if student_logits.shape[0] < 2:
        raise ValueError("DIST's intra-class term correlates each class across the batch: "
                         "student_logits and teacher_logits need a batch size of at least 2, "
                         f"got {student_logits.shape[0]}; drop such batches (e.g. "
                         "DataLoader(drop_last=True))")
    core = backends.choose(CORE, backend, student_logits, teacher_logits).fn
    per_sample = core(student_logits, teacher_logits, float(temperature), float(beta),
                      float(gamma), float(eps))
    return _checks.reduce(per_sample, reduction)


class DISTLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.dist_loss`; ``forward(student_logits,
    teacher_logits)``.

    Defaults (torchdistill / mmrazor): ``temperature=1.0``, ``beta=1.0``, ``gamma=1.0``,
    ``eps=1e-8``, ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.DISTLoss(beta=1.0, gamma=1.0, temperature=1.0)
        >>> loss = 2.0 * criterion(student(x), teacher(x).detach())  # doctest: +SKIP
    """

    function = staticmethod(dist_loss)
    validate = staticmethod(check_dist_options)

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 eps: float = COSINE_EPS, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, beta=beta, gamma=gamma, eps=eps,
                         reduction=reduction, backend=backend)

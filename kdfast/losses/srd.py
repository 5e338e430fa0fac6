"""Softmax regression representation distillation: ``srd_loss`` and ``SRDLoss`` (Miles &
Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024),
as torchdistill's ``SRDLoss``."""

from __future__ import annotations

import torch

from kdfast import _checks
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair, kd_per_sample
from kdfast.reference.srd import srd_feature_term

FEATURE_NDIMS = (2, 3, 4, 5)


def check_srd_options(exponent: float = 1.0, temperature: float = 1.0,
                      reduction: str = "mean") -> None:
    _checks.check_positive("exponent", exponent)
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def srd_loss(student: torch.Tensor, teacher: torch.Tensor, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor, *, exponent: float = 1.0, temperature: float = 1.0,
             reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""SRD loss (Miles & Mikolajczyk, 2024), torchdistill's ``SRDLoss``.

    .. math::
        \mathcal{L} = 2\log\sum_{b,d}\lvert f^s_{b,d} - f^t_{b,d}\rvert^{e}
          + \frac1B\sum_b \mathrm{KL}\big(\mathrm{softmax}(z^t_b/T)\,\|\,
            \mathrm{softmax}(z^s_b/T)\big)

    on the student's projected (in torchdistill: linear + BatchNorm1d of the pooled map)
    features f_s and the teacher's features f_t of the same shape, and on the logits z.
    Defaults ``exponent=1``, ``temperature=1`` are torchdistill's (its example config uses
    exponent 4); the KL has no T² factor (``nn.KLDivLoss(reduction='batchmean')``). The paper's
    "softmax regression" variant feeds the student's features through the teacher's
    classifier: pass ``teacher_head(student_features)`` as ``student_logits`` for it.

    The KL runs on the fused ``"softmax_kl"`` core; the feature term is plain PyTorch.

    Args:
        student: (B, D) (or (B, ...)) student features, projected to the teacher's shape.
        teacher: teacher features, the shape of ``student``.
        student_logits, teacher_logits: (B, num_classes) logits.
        exponent: e > 0, default 1.0. temperature: T > 0, default 1.0.
        reduction: ``"mean"`` (default) gives the loss above; ``"sum"`` and ``"none"`` act on
            the (B,) values ``2 log(...) + KL_b`` (every row holds the feature term, a batch
            statistic) whose mean is the loss.
        backend: for the ``"softmax_kl"`` core, as in :func:`kdfast.functional.kd_loss`.

    Example:
        >>> f_s, f_t = torch.randn(8, 512), torch.randn(8, 512)
        >>> z_s, z_t = torch.randn(8, 100), torch.randn(8, 100)
        >>> kdfast.functional.srd_loss(f_s, f_t, z_s, z_t)  # doctest: +SKIP
    """
    check_srd_options(exponent, temperature, reduction)
    _checks.check_tensor("student", student, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_tensor("teacher", teacher, FEATURE_NDIMS, "(B, D) or (B, ...)")
    _checks.check_logits("student_logits", student_logits)
    _checks.check_logits("teacher_logits", teacher_logits)
    _checks.check_same_batch(student, student_logits, ("student", "student_logits"))
    _checks.check_same_shape(student, teacher, fix=(
        "project the student's features to the teacher's shape first (SRD's projector)"))
    check_logit_pair(student_logits, teacher_logits)
    student, teacher, student_logits, teacher_logits = _checks.promote(
        student, teacher, student_logits, teacher_logits)
    temperature = float(temperature)
    kl = kd_per_sample(student_logits, teacher_logits, temperature, backend) / temperature**2
    return _checks.reduce(srd_feature_term(student, teacher, float(exponent)).to(kl.dtype) + kl,
                          reduction)


class SRDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.srd_loss`;
    ``forward(student, teacher, student_logits, teacher_logits)``.

    Example:
        >>> kdfast.SRDLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 10),
        ...                  torch.randn(4, 10))  # doctest: +SKIP
    """

    function = staticmethod(srd_loss)
    validate = staticmethod(check_srd_options)

    def __init__(self, exponent: float = 1.0, temperature: float = 1.0,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(exponent=exponent, temperature=temperature, reduction=reduction,
                         backend=backend)

"""Softmax regression representation distillation, SRD (Miles & Mikolajczyk, "Understanding
the Role of the Projector in Knowledge Distillation", AAAI 2024), as torchdistill's ``SRDLoss``.

On (projected, normalised) features f_s, f_t of equal shape and logits z_s, z_t:
loss = 2 log(sum over the batch and all entries of |f_s - f_t|^exponent)
       + (1/B) sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T)),
with ``exponent = 1``, ``T = 1`` (torchdistill's defaults; its example config uses
exponent 4) and no T^2 factor on the KL (``nn.KLDivLoss(reduction='batchmean')``).
"""

import torch

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import softmax_kl


def srd_feature_term(student: torch.Tensor, teacher: torch.Tensor, exponent: float = 1.0
                     ) -> torch.Tensor:
    """2 log(sum |f_s - f_t|^exponent), a scalar over the whole batch."""
    diff = (upcast_low_precision(student) - upcast_low_precision(teacher)).abs()
    return 2.0 * torch.log(diff.pow(exponent).sum())


def srd_loss(student: torch.Tensor, teacher: torch.Tensor, student_logits: torch.Tensor,
             teacher_logits: torch.Tensor, exponent: float = 1.0, temperature: float = 1.0
             ) -> torch.Tensor:
    """Per-sample SRD loss, (B,): the batch feature term plus the sample's KL; the mean is
    torchdistill's loss."""
    kl = softmax_kl(student_logits, teacher_logits, temperature) / temperature**2
    return srd_feature_term(student, teacher, exponent).to(kl.dtype) + kl

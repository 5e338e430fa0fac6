"""Logit standardisation before KD (Sun, Ren, Li, Wang & Cao, "Logit Standardization in
Knowledge Distillation", CVPR 2024), as torchdistill's ``LogitStdKDLoss`` computes it.

Each sample's logits are z-scored over the classes,
``Z(z) = (z − mean(z)) / (eps + std(z))`` with the *unbiased* standard deviation (Bessel's
correction, ``torch.std``'s default; so at least two classes) and ``eps = 1e-7`` added to it,
then KD runs on the standardised logits: T² · KL(softmax(Z(t)/T) ‖ softmax(Z(s)/T)) per
sample, the forward divergence of the ``"softmax_kl"`` core. T is the *base* temperature of
the paper (torchdistill's example and the paper's code: 2).
"""

from __future__ import annotations

import torch

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import softmax_kl

STD_EPS = 1e-7


def standardize(logits: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """(z − mean) / (eps + unbiased std) per row of (B, C) logits (float32 for half inputs)."""
    z = upcast_low_precision(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


def lskd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 2.0, eps: float = STD_EPS) -> torch.Tensor:
    """T² · KL of the softened standardised logits per sample: (B,)."""
    return softmax_kl(standardize(student_logits, eps), standardize(teacher_logits, eps),
                      temperature)

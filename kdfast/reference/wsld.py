"""Weighted soft labels (Zhou, Song, Chen, Zhou, Wang, Yuan & Zhang, "Rethinking Soft Labels
for Knowledge Distillation: A Bias-Variance Tradeoff Perspective", ICLR 2021), as mmrazor's
``WSLD`` (and the paper's code) computes it.

Per sample, the soft cross-entropy to the teacher's softened distribution, weighted by how
much better the teacher does on the label than the student:

    w = 1 − exp(−max(CE(s, y) / (CE(t, y) + 1e-7), 0)),   CE at temperature 1, detached
    WSLD = w · T² · H(p_t, p_s) = w · T² · (KL(p_t ‖ p_s) + H(p_t)),   p = softmax(z / T)

The weight is a constant of the gradient (computed on detached logits). The KL is the forward
divergence of the ``"softmax_kl"`` core; H(p_t), the teacher's entropy, makes the value the
cross-entropy of the paper (with a detached teacher it adds no student gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import kl_terms, softmax_kl

RATIO_EPS = 1e-7


def sample_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """w = 1 − exp(−max(CE_s / (CE_t + 1e-7), 0)) per sample, detached: (B,)."""
    ce_s = F.cross_entropy(upcast_low_precision(student_logits.detach()), targets,
                           reduction="none")
    ce_t = F.cross_entropy(upcast_low_precision(teacher_logits.detach()), targets,
                           reduction="none")
    return 1.0 - torch.exp(-(ce_s / (ce_t + RATIO_EPS)).clamp_min(0.0))


def softened_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · H(softmax(logits / T)) per row: (B,) (entries of probability 0 add 0)."""
    log_p = F.log_softmax(upcast_low_precision(logits) / temperature, dim=1)
    return -temperature**2 * kl_terms(log_p, torch.zeros_like(log_p)).sum(dim=1)


def wsld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """w · T² · H(p_t, p_s) per sample: (B,)."""
    soft_ce = (softmax_kl(student_logits, teacher_logits, temperature)
               + softened_entropy(teacher_logits, temperature))
    return sample_weights(student_logits, teacher_logits, targets) * soft_ce

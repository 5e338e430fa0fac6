"""DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu,
NeurIPS 2022), as torchdistill's ``DISTLoss`` computes it (mmrazor's ``DISTLoss`` likewise).

With y = softmax(z / τ) for the (B, C) logits and ρ the Pearson correlation
(the cosine similarity of the mean-centred vectors):

* inter-class relation: 1 − mean over samples b of ρ(y_s[b, :], y_t[b, :]);
* intra-class relation: 1 − mean over classes c of ρ(y_s[:, c], y_t[:, c]) (a batch term);

DIST = τ² · (β · inter + γ · intra). The cosine is ``F.cosine_similarity`` with ``eps=1e-8``
(each norm clamped to at least eps, torchdistill's); mmrazor divides by
‖a‖·‖b‖ + eps instead, a relative difference of about eps / (‖a‖·‖b‖).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision

COSINE_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """ρ(a[i, :], b[i, :]) per row of two (N, M) tensors: (N,)."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True),
                               b - b.mean(dim=1, keepdim=True), dim=1, eps=eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
              eps: float = COSINE_EPS) -> torch.Tensor:
    """Per-sample DIST values, (B,), whose mean is the loss: sample b carries
    τ² · (β · (1 − ρ_b) + γ · intra), the intra-class term being shared by the batch."""
    y_s = F.softmax(upcast_low_precision(student_logits) / temperature, dim=1)
    y_t = F.softmax(upcast_low_precision(teacher_logits) / temperature, dim=1)
    inter = 1.0 - pearson_rows(y_s, y_t, eps)
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t(), eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)

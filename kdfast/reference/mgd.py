"""Masked generative distillation, MGD (Yang et al., "Masked Generative Distillation",
ECCV 2022; mmrazor's ``MGDLoss`` and ``MGDConnector``).

The student's map (aligned to the teacher's channels by a 1x1 conv when they differ) is
masked by a random spatial mask M (one per sample and position, shared by the channels; a
position is dropped with probability λ), a small generation block G (3x3 conv, ReLU, 3x3
conv) must regenerate the teacher's full map from what is left, and

    ℓ_b = α · Σ_{c,h,w} (G(M ⊙ align(s)) − t)²_{b,c,h,w},

so the batch mean of ℓ_b is mmrazor's ``MSELoss(reduction="sum") / N · alpha_mgd``.
"""

from __future__ import annotations

import torch

from kdfast.reference.numerics import upcast_low_precision


def random_spatial_mask(batch: int, height: int, width: int, lambda_mgd: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, 1, height, width) of 0 (dropped, probability ``lambda_mgd``) and 1 (kept),
    float32 on the CPU: u ~ U[0, 1) per position, dropped where u > 1 − λ (mmrazor's rule,
    drawn from the CPU generator as there; ``generator`` None: the global one)."""
    u = torch.rand((batch, 1, height, width), generator=generator)
    return (u <= 1.0 - lambda_mgd).float()


def mgd_loss(generated: torch.Tensor, teacher: torch.Tensor,
             alpha_mgd: float = 2e-5) -> torch.Tensor:
    """α · Σ (generated − teacher)² per sample of (N, C, H, W) maps: shape (N,)."""
    difference = upcast_low_precision(generated) - upcast_low_precision(teacher)
    return alpha_mgd * difference.pow(2).flatten(1).sum(dim=1)

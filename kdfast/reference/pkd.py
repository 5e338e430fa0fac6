"""Pearson-correlation distillation, PKD (Cao et al., "PKD: General Distillation Framework
for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022; mmrazor's
``PKDLoss``).

Each map is standardised per channel over the batch and positions (N, H, W) — zero mean,
unit standard deviation (the unbiased one, as ``torch.std``; ``std + 1e-6`` in the
denominator, as mmrazor) — and the student's standardised map is pulled to the teacher's by
half the mean squared error. For standardised vectors of n entries,
‖x̂ − ŷ‖² / n = 2 (n − 1)/n · (1 − r) with r their Pearson correlation, so the loss is
≈ 1 − r per channel: imitating the correlation, not the magnitude, of the teacher's features.

Per sample (the standardisation couples the batch, the loss terms do not):

    ℓ_b = loss_weight · Σ_{c,h,w} (ŝ − t̂)²_{b,c,h,w} / (2 C H W),

so the batch mean of ℓ_b is mmrazor's ``F.mse_loss(ŝ, t̂) / 2 · loss_weight``. One value per
channel (N·H·W = 1) has no standard deviation: NaN, as in mmrazor.
"""

from __future__ import annotations

import torch

from kdfast.reference.numerics import upcast_low_precision

STD_EPS = 1e-6  # mmrazor's: added to the standard deviation


def standardise_channels(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / (std + 1e-6) per channel, the statistics over (N, H, W)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + STD_EPS)


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor,
             loss_weight: float = 1.0) -> torch.Tensor:
    """loss_weight · ‖standardise(s)_b − standardise(t)_b‖² / (2 C H W) on (N, C, H, W) maps
    of one shape: shape (N,)."""
    s_hat = standardise_channels(upcast_low_precision(student))
    t_hat = standardise_channels(upcast_low_precision(teacher))
    return loss_weight * (s_hat - t_hat).pow(2).flatten(1).mean(dim=1) / 2

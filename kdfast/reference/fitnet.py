"""FitNets hint loss (Romero et al., ICLR 2015).

loss_b = mean over C*H*W of (r(s) - t)^2, with r the connector (regressor) applied beforehand;
the batch mean of the per-sample values is the global mean, ``F.mse_loss(r(s), t)``.
"""

import torch

from kdfast.reference.numerics import upcast_low_precision


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of two equally shaped (B, ...) tensors, shape (B,)."""
    diff = upcast_low_precision(student) - upcast_low_precision(teacher)
    return diff.pow(2).flatten(1).mean(dim=1)

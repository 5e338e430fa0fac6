"""Mixed precision: every loss computes in fp32 (or fp64) and returns fp32 for fp16/bf16 inputs.

Under ``torch.autocast`` the features reaching a loss are fp16/bf16. The losses switch autocast
off around their own computation (an autocast-listed matmul inside a reference would otherwise
drop back to bf16) and accumulate in fp32: the references upcast low-precision inputs
(:func:`upcast_low_precision`), the fused kernels read them as they are and accumulate in fp32.
Gradients flow back in the inputs' dtype.
"""

from __future__ import annotations

import contextlib

import torch

from kdfast.reference.numerics import LOW_PRECISION, NORM_EPS, upcast_low_precision, vector_norm

__all__ = ["LOW_PRECISION", "NORM_EPS", "accumulation_dtype", "autocast_off",
           "upcast_low_precision", "vector_norm"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``tensor``'s device type (a no-op where it is not
    on: entering an autocast context costs as much as a small kernel)."""
    device = tensor.device.type
    if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, enabled=False)


def accumulation_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """What the fused kernels accumulate (and return losses) in for a tensor or dtype: fp64
    for fp64, else fp32."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32

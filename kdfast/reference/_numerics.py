"""Numerics shared by the references: low-precision inputs are computed in float32."""

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcast_low_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16/bfloat16 (accumulate in fp32), else ``x`` itself.

    Gram entries sum D products, so a float16 ``Q Q^T`` overflows (65504) at quite ordinary
    feature sizes; the losses built on them are returned in float32 for such inputs.
    """
    return x.float() if x.dtype in LOW_PRECISION else x

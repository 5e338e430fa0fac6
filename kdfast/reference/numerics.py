"""Numerics shared by the references: low-precision inputs are computed in float32."""

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
# The eps of every normalisation (F.normalize's default): one value for all cores and backends.
NORM_EPS = 1e-12


def upcast_low_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is float16/bfloat16 (accumulate in fp32), else ``x`` itself.

    Gram entries sum D products, so a float16 ``Q Q^T`` overflows (65504) at quite ordinary
    feature sizes; the losses built on them are returned in float32 for such inputs.
    """
    return x.float() if x.dtype in LOW_PRECISION else x



def _power_of_two_scale(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per slice along ``dim`` (kept), the power of two s bringing max |x| into [0.5, 1);
    1 for all-zero and non-finite slices. Detached: a constant of the computation."""
    peak = x.detach().abs().amax(dim=dim, keepdim=True)
    exponent = torch.frexp(peak).exponent
    exponent = torch.where(torch.isfinite(peak), exponent, torch.zeros_like(exponent))
    return torch.ldexp(torch.ones_like(peak), -exponent)


def vector_norm(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """‖x‖₂ along ``dim``, finite for every finite x: ‖s x‖ / s with s from
    :func:`_power_of_two_scale` (exact: the plain norm wherever that one is finite)."""
    scale = _power_of_two_scale(x, dim)
    norm = torch.linalg.vector_norm(x * scale, dim=dim, keepdim=True) / scale
    return norm if keepdim else norm.squeeze(dim)


def normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    """x / max(‖x‖₂, eps) along ``dim``, like ``F.normalize``, but finite for every finite x.

    ``F.normalize`` sums x² in x's dtype: where that overflows (float32 |x| ≳ 1e19 / √n) the
    norm is inf and it returns 0s, silently. Here every slice is first scaled by the power of
    two s that brings its largest |x| into [0.5, 1): (s x) / max(‖s x‖, s eps) is exactly the
    same quotient (power-of-two scaling rounds nothing outside the subnormal range), so the
    result equals ``F.normalize`` wherever that one is finite. s is a constant (no gradient).
    Non-finite slices keep s = 1 and give NaN like ``F.normalize``.
    """
    scale = _power_of_two_scale(x, dim)
    scaled = x * scale
    norm = torch.linalg.vector_norm(scaled, dim=dim, keepdim=True)
    return scaled / torch.maximum(norm, eps * scale)

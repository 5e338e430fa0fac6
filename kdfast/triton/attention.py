r"""Triton attention p-norm map (AT): q̂ = Q / max(‖Q‖, 1e-12), Q = mean_C |A|^p, (B, H·W).

Kernels (docs/design.md, "Attention p-norm"):

* ``_at_forward_kernel``, grid (B, HW blocks): loops over C and reads each feature once,
  writes Q for its block and the block's partial Σ Q² (one slot per program, no atomics).
* ``_at_normalise_kernel``, grid (B, HW blocks): sums the partials of its sample in a fixed
  order (deterministic), divides its block of Q in place and stores ‖Q‖.
* ``_at_backward_kernel``, grid (B, HW blocks): dQ = (dq̂ − ⟨dq̂, q̂⟩q̂)/n from the small maps
  (⟨dq̂, q̂⟩ per sample comes in precomputed), then loops over C reading A once and writing
  dA = (p/C)·|A|^{p−1}·sign(A)·dQ once.

Features are read through their strides (channels_last without a copy) with int64 offsets.
The map is float32 (float64 for float64 inputs); the gradient has the input's dtype and layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast._precision import accumulation_dtype
from kdfast.triton._common import NORM_EPS, configs, feature_view, overflowed, spatial_offset

# P_MODE: 0 for p == 2 (a*a), 1 for p == 1 (|a|), 2 for any other p (exp(p log|a|)).
_P_SQUARE, _P_ABS, _P_GENERAL = 0, 1, 2


def _p_mode(p: float) -> int:
    return _P_SQUARE if p == 2.0 else _P_ABS if p == 1.0 else _P_GENERAL


_TUNED = [{"BLOCK_C": c, "BLOCK_HW": hw, "num_warps": w}
          for c, hw, w in [(8, 256, 4), (16, 256, 4), (8, 512, 4), (16, 512, 8),
                           (32, 128, 4), (4, 1024, 8)]]
_CONFIGS = configs({"BLOCK_C": 8, "BLOCK_HW": 32}, _TUNED)


@triton.jit
def _abs_pow(a, p, P_MODE: tl.constexpr):
    if P_MODE == 0:
        out = a * a
    elif P_MODE == 1:
        out = tl.abs(a)
    else:
        # mag != 0, not mag > 0: a NaN input must give NaN, not the 0 of a zero activation.
        mag = tl.abs(a)
        out = tl.where(mag != 0, tl.exp(p * tl.log(tl.where(mag != 0, mag, 1.0))), 0.0)
    return out


@triton.jit
def _abs_pow_grad(a, p, P_MODE: tl.constexpr):
    """d|a|^p / da = p |a|^(p-1) sign(a) (0 at a = 0, like autograd)."""
    if P_MODE == 0:
        out = 2.0 * a
    elif P_MODE == 1:
        out = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))
    else:
        mag = tl.abs(a)
        safe = tl.where(mag != 0, mag, 1.0)
        out = tl.where(mag != 0, p * tl.exp((p - 1.0) * tl.log(safe)) * (a / safe), 0.0)
    return out


# Q[b, hw] = (1/C) Σ_c |A[b, c, hw]|^p for one block of positions, and the block's Σ Q² (the
# partial of ‖Q‖², summed by _at_normalise_kernel in a fixed order).
@triton.autotune(configs=_CONFIGS, key=["C", "HW"])
@triton.jit
def _at_forward_kernel(x_ptr, q_ptr, part_ptr, p_ptr, C, HW,
                       stride_b, stride_c, W, stride_h, stride_w,
                       num_blocks, P_MODE: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    hw64 = hw.to(tl.int64)
    spatial = spatial_offset(hw64, W, stride_h, stride_w)
    acc = tl.zeros([BLOCK_HW], dtype=q_ptr.dtype.element_ty)
    p = tl.load(p_ptr)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        offs = b * stride_b + c.to(tl.int64)[:, None] * stride_c + spatial[None, :]
        mask = (c < C)[:, None] & hw_ok[None, :]
        a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(q_ptr.dtype.element_ty)
        acc += tl.sum(_abs_pow(a, p, P_MODE), axis=0)
    q = acc / C
    tl.store(q_ptr + b * HW + hw64, q, mask=hw_ok)
    tl.store(part_ptr + b * num_blocks + blk, tl.sum(q * q, axis=0))


@triton.jit
def _rescaled_norm(row_ptr, n, BLOCK: tl.constexpr):
    """‖v‖ of the n values at row_ptr as peak · ‖v / peak‖, peak = max |v|: finite for finite
    v where Σ v² overflows (float32 |v| ≳ 1e19/√n). Only taken on that overflow."""
    peaks = tl.zeros([BLOCK], dtype=row_ptr.dtype.element_ty)
    for k0 in range(0, n, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        peaks = tl.maximum(peaks, tl.abs(tl.load(row_ptr + k, mask=k < n, other=0.0)))
    peak = tl.max(peaks, axis=0)
    total = tl.zeros([BLOCK], dtype=row_ptr.dtype.element_ty)
    for k0 in range(0, n, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        u = tl.load(row_ptr + k, mask=k < n, other=0.0) / peak
        total += u * u
    return peak * tl.sqrt(tl.sum(total, axis=0))


# ‖Q‖ = sqrt(Σ partials) (rescaled where Σ Q² overflowed), q̂ = Q / max(‖Q‖, eps) in place.
@triton.jit
def _at_normalise_kernel(q_ptr, part_ptr, norm_ptr, HW, num_blocks, eps,
                         BLOCK_HW: tl.constexpr, BLOCKS_POW2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    slots = tl.arange(0, BLOCKS_POW2)
    parts = tl.load(part_ptr + b * num_blocks + slots, mask=slots < num_blocks, other=0.0)
    norm = tl.sqrt(tl.sum(parts, axis=0))
    if overflowed(norm):  # Σ Q² overflowed: every program of the sample redoes ‖Q‖ scaled
        norm = _rescaled_norm(q_ptr + b * HW, HW, BLOCK_HW)
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    q = tl.load(q_ptr + b * HW + hw, mask=hw_ok, other=0.0)
    tl.store(q_ptr + b * HW + hw, q / tl.maximum(norm, eps), mask=hw_ok)
    tl.store(norm_ptr + b, norm, mask=blk == 0)


# dQ = (dq̂ − ⟨dq̂, q̂⟩ q̂)/n (the projection only where ‖Q‖ > eps, n = max(‖Q‖, eps)), then
# dA[c] = (1/C) · d|a|^p/da · dQ for every channel of one block of positions.
@triton.autotune(configs=_CONFIGS, key=["C", "HW"])
@triton.jit
def _at_backward_kernel(x_ptr, dx_ptr, gmap_ptr, qhat_ptr, along_ptr, norm_ptr, p_ptr, C, HW,
                        x_stride_b, x_stride_c, x_W, x_stride_h, x_stride_w,
                        dx_stride_b, dx_stride_c, dx_W, dx_stride_h, dx_stride_w, eps,
                        P_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    hw64 = hw.to(tl.int64)
    g = tl.load(gmap_ptr + b * HW + hw64, mask=hw_ok, other=0.0)
    q_hat = tl.load(qhat_ptr + b * HW + hw64, mask=hw_ok, other=0.0)
    along = tl.load(along_ptr + b)
    norm = tl.load(norm_ptr + b)
    p = tl.load(p_ptr)
    grad_q = tl.where(norm > eps, g - along * q_hat, g) / tl.maximum(norm, eps) / C
    src = spatial_offset(hw64, x_W, x_stride_h, x_stride_w)
    dst = spatial_offset(hw64, dx_W, dx_stride_h, dx_stride_w)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (c < C)[:, None] & hw_ok[None, :]
        a = tl.load(x_ptr + b * x_stride_b + c[:, None] * x_stride_c + src[None, :], mask=mask,
                    other=0.0)
        local = _abs_pow_grad(a.to(g.dtype), p, P_MODE)
        grad = (local * grad_q[None, :]).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + b * dx_stride_b + c[:, None] * dx_stride_c + dst[None, :], grad,
                 mask=mask)


def _exponent(p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """p as a one-element tensor: a Python float argument would reach the kernel as float32."""
    return torch.tensor([p], dtype=dtype, device=device)


def _grid(batch: int, hw: int):
    return lambda meta: (batch, triton.cdiv(hw, meta["BLOCK_HW"]))


def attention_forward(features: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q̂ (B, HW), ‖Q‖ (B,)) in the compute dtype; two launches, no feature-size temporary."""
    batch, channels, height, width = features.shape
    hw = height * width
    dtype = accumulation_dtype(features.dtype)
    q = torch.empty(batch, hw, dtype=dtype, device=features.device)
    norm = torch.empty(batch, dtype=dtype, device=features.device)
    # One partial slot per program of the smallest HW block any configuration uses.
    min_block = min(c.kwargs["BLOCK_HW"] for c in _CONFIGS)
    slots = triton.cdiv(hw, min_block)
    parts = torch.zeros(batch, slots, dtype=dtype, device=features.device)
    _at_forward_kernel[_grid(batch, hw)](
        features, q, parts, _exponent(p, dtype, features.device), channels, hw,
        *feature_view(features), slots, P_MODE=_p_mode(p))
    block = 128
    _at_normalise_kernel[(batch, triton.cdiv(hw, block))](
        q, parts, norm, hw, slots, NORM_EPS, BLOCK_HW=block,
        BLOCKS_POW2=triton.next_power_of_2(slots))
    return q, norm


def attention_backward(grad_map: torch.Tensor, features: torch.Tensor, q_hat: torch.Tensor,
                       norm: torch.Tensor, p: float) -> torch.Tensor:
    """dA in the input's dtype and memory layout: one pass reading A and writing dA."""
    batch, channels, height, width = features.shape
    hw = height * width
    grad_map = grad_map.to(q_hat.dtype).contiguous()
    along = (grad_map * q_hat).sum(dim=1).contiguous()
    grad = torch.empty_like(features)
    _at_backward_kernel[_grid(batch, hw)](
        features, grad, grad_map, q_hat, along, norm, _exponent(p, q_hat.dtype, features.device),
        channels, hw, *feature_view(features), *feature_view(grad), NORM_EPS, P_MODE=_p_mode(p))
    return grad

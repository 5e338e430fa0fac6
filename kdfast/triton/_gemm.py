r"""The GEMM-shaped backward kernel shared by the Gram (SP, FSP) and channel-MMD cores.

``rows_gemm`` computes out[b, i, :] = Σ_j M1[b, i, j] Z1[b, j, :] (+ Σ_j M2 Z2) over
raw features read through their (C, H, W) strides and writes the gradient in the input's
dtype and layout. M is scaled by its per-sample max before the cast to float16/bfloat16 (so
tiny weights are not flushed) and the accumulator scaled back; accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.triton._common import configs, dot_precision, feature_view, spatial_offset

_GEMM_TUNED = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_J": j, "num_warps": w,
                "num_stages": s}
               for m, n, j, w, s in [(64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                                     (64, 64, 64, 4, 3), (32, 256, 32, 8, 3),
                                     (128, 64, 64, 4, 4)]]
_GEMM_CONFIGS = configs({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 16}, _GEMM_TUNED)


@triton.jit
def _accumulate_rows(acc, m_ptr, z_ptr, b, rows, row_ok, cols, col_ok, N, scale,
                     m_stride_b, m_stride_i, m_stride_j,
                     z_stride_b, z_stride_c, z_W, z_stride_h, z_stride_w,
                     DOT_PRECISION: tl.constexpr, BLOCK_J: tl.constexpr):
    """acc += (M[b, rows, :] / scale) @ Z[b, :, cols] over the N rows (channels) of Z."""
    z_spatial = spatial_offset(cols, z_W, z_stride_h, z_stride_w)
    for j0 in range(0, N, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        j_ok = j < N
        m = tl.load(m_ptr + b * m_stride_b + rows[:, None] * m_stride_i + j[None, :] * m_stride_j,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        z = tl.load(z_ptr + b * z_stride_b + j[:, None] * z_stride_c + z_spatial[None, :],
                    mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot((m / scale).to(z.dtype), z, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
    return acc


@triton.autotune(configs=_GEMM_CONFIGS, key=["R", "N1", "N2", "K"])
@triton.jit
def _rows_gemm_kernel(m1_ptr, z1_ptr, m2_ptr, z2_ptr, scale_ptr, out_ptr, R, N1, N2, K,
                      m1_stride_b, m1_stride_i, m1_stride_j,
                      z1_stride_b, z1_stride_c, z1_W, z1_stride_h, z1_stride_w,
                      m2_stride_b, m2_stride_i, m2_stride_j,
                      z2_stride_b, z2_stride_c, z2_W, z2_stride_h, z2_stride_w,
                      out_stride_b, out_stride_c, out_W, out_stride_h, out_stride_w,
                      HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < R
    col_ok = cols < K
    scale = tl.load(scale_ptr + b)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=scale_ptr.dtype.element_ty)
    acc = _accumulate_rows(acc, m1_ptr, z1_ptr, b, rows, row_ok, cols, col_ok, N1, scale,
                           m1_stride_b, m1_stride_i, m1_stride_j, z1_stride_b, z1_stride_c,
                           z1_W, z1_stride_h, z1_stride_w, DOT_PRECISION, BLOCK_J)
    if HAS_SECOND:
        acc = _accumulate_rows(acc, m2_ptr, z2_ptr, b, rows, row_ok, cols, col_ok, N2, scale,
                               m2_stride_b, m2_stride_i, m2_stride_j, z2_stride_b, z2_stride_c,
                               z2_W, z2_stride_h, z2_stride_w, DOT_PRECISION, BLOCK_J)
    out_spatial = spatial_offset(cols, out_W, out_stride_h, out_stride_w)
    tl.store(out_ptr + b * out_stride_b + rows[:, None] * out_stride_c + out_spatial[None, :],
             (acc * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def rows_gemm(out: torch.Tensor, m1: torch.Tensor, z1: torch.Tensor,
              m2: torch.Tensor | None = None, z2: torch.Tensor | None = None,
              z_view=None, out_view=None) -> torch.Tensor:
    """out[b] = m1[b] @ z1[b] (+ m2[b] @ z2[b]) with z*, out (B, rows, H, W) features.

    ``m1`` (B, R, N1) and ``m2`` (B, R, N2) in the compute dtype, any strides. ``z_view`` /
    ``out_view`` override the (batch, row, W, h, w) strides (SP passes its flat rows).
    """
    batch, rows, n1 = m1.shape
    z1_view = z_view or feature_view(z1)
    o_view = out_view or feature_view(out)
    cols = out.numel() // max(batch * rows, 1)
    has_second = m2 is not None
    scale = m1.abs().amax(dim=(1, 2))
    if has_second:
        scale = torch.maximum(scale, m2.abs().amax(dim=(1, 2)))
    scale = scale.clamp_min(torch.finfo(scale.dtype).tiny).contiguous()
    if not has_second:
        m2, z2, z2_view, n2 = m1, z1, z1_view, 0
    else:
        z2_view, n2 = (z_view or feature_view(z2)), m2.shape[2]
    grid = lambda meta: (batch, triton.cdiv(rows, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(cols, meta["BLOCK_N"]))
    _rows_gemm_kernel[grid](
        m1, z1, m2, z2, scale, out, rows, n1, n2, cols,
        *m1.stride(), *z1_view, *m2.stride(), *z2_view, *o_view,
        HAS_SECOND=has_second, DOT_PRECISION=dot_precision(z1.dtype))
    return out



r"""Triton channel MMD (NST, core ``"channel_mmd"``): per-sample MMD² over channels-as-samples.

Per sample, X (m = C_s rows) and Y (n = C_t rows) of D = H·W raw features (docs/design.md):

* ``_mmd_block_kernel``, grid (B, tiles of one block): one launch per block of the stacked
  Gram [X; Y][X; Y]ᵀ — G_ss and G_tt symmetric (upper tiles only, off-diagonal tiles counted
  twice), G_st in full. The K-loop accumulates the raw Gram tile *and* the squared row norms
  of the rows it loads, so normalisation is the epilogue's scaling g = G_ij / (r_i r_j), never
  a normalised copy. The epilogue applies φ (linear g, poly (g + c)^d, rbf Σ_σ
  exp(−max(ρ_i² + ρ_j² − 2g, 0)/(2σ²))), masks the diagonal for the unbiased estimator,
  writes one partial per program; the partials are summed per block in a fixed order (no
  atomics: deterministic) and weighted (1/m², 1/n² or 1/(m(m−1)), ..., −2/(mn)) in float64
  on the host side of the sum (a Python float kernel argument would be rounded to float32).
  When a gradient is needed it also stores the normalised Gram blocks the backward uses
  (ss and st for the student, st and tt for the teacher: O(B·C²), allowed by §3).
* ``sigma2="mean"``: ``_row_sq_kernel`` (row norms) and ``_unit_sum_kernel`` (S_x = Σ_i x̂_i,
  S_y = Σ_j ŷ_j and their products per sample, partials per HW block) give σ² in O(C·D) before
  the Gram launches.
* ``kernel="linear"`` needs no Gram at all: MMD² from ‖S_x‖², ‖S_y‖², S_x·S_y (the same two
  kernels), backward ``_linear_backward_kernel``: dL/dx̂_i is one D-vector per sample, so each
  input's gradient is one pass that reads its rows twice and writes them once.
* backward: the weights W = ∂L/∂g of the small C × C blocks (autograd over B·C² values with
  the reference's own kernel formulas), then with n = max(r, 1e-12) and
  c_i = Σ_j (W_ss + W_ssᵀ)_ij g_ij + Σ_j W_st,ij g_st,ij (0 for rows with r ≤ eps):
  dX = M_xx X + M_xy Y, M_xx = diag(1/n)(W_ss + W_ssᵀ)diag(1/n) − diag(c/n²),
  M_xy = diag(1/n) W_st diag(1/n_y): one GEMM-shaped ``_rows_gemm_kernel`` launch over the raw
  features per input (the normalisation backward lives in M), likewise dY.

Backward choice, by map size (``kdfast.ops.mmd.MMD_RECOMPUTE_MAX_HW``, 128 positions):

* small maps (7×7, 8×8, 11×11 ...), where C² ≫ C·HW: ``_mmd_recompute_backward_kernel``,
  flash-style. One program per tile of rows holds the whole map of its rows in registers,
  recomputes every tile of g from the raw features (two tl.dot per tile: g, then W·X̂) and
  never reads or writes a Gram block: the forward keeps only the row norms and σ². It costs
  about twice the backward GEMM flops and saves the B·C² blocks and the B·C² weight
  temporaries built from them (at B = 64, C = 512 + 2048, 7×7: 335 MB kept, over 1 GB of
  temporaries).
* larger maps: the saved normalised Gram blocks and the weights from them (above), where
  the blocks are small next to the features.

The threshold is a count, not a measurement: no GPU has run these kernels yet, and
``scripts/gpu_check.sh`` benchmarks both sides of it.

These kernels serve two of channel MMD's three paths (:func:`kdfast.ops.mmd.channel_mmd_path`):
``GRAM`` (operators ``kdfast_triton::channel_mmd_gram(_backward)``) and ``LINEAR``
(``kdfast_triton::channel_mmd_linear(_backward)``), both defined in :mod:`kdfast.ops.mmd`.
``FEATURE_GRAM`` (poly d = 2 on maps smaller than the channel count) runs
:func:`kdfast.ops.mmd.feature_gram_channel_mmd`, torch's batched matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast._precision import accumulation_dtype
from kdfast.ops.mmd import kept_gram_blocks, recomputes_grams
from kdfast.reference.nst import as_bandwidths, kernel_slopes
from kdfast.triton._common import (
    NORM_EPS,
    configs,
    dot_precision,
    feature_view,
    spatial_offset,
)
from kdfast.triton._gemm import rows_gemm

_KERNELS = {"linear": 0, "poly": 1, "rbf": 2}
_MMD_TUNED = [{"BLOCK_M": m, "BLOCK_K": k, "num_warps": w, "num_stages": s}
              for m, k, w, s in [(64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 8, 3),
                                 (32, 64, 4, 4), (128, 64, 8, 3)]]
_MMD_CONFIGS = configs({"BLOCK_M": 16, "BLOCK_K": 16}, _MMD_TUNED)
_ROW_BLOCK, _HW_BLOCK = 16, 64
_RECOMPUTE_TUNED = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                    for m, n, w, s in [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
                                       (64, 64, 8, 2)]]
_RECOMPUTE_CONFIGS = configs({"BLOCK_M": 16, "BLOCK_N": 16}, _RECOMPUTE_TUNED)


@triton.autotune(configs=_MMD_CONFIGS, key=["RA", "RB", "HW"])
@triton.jit
def _mmd_block_kernel(a_ptr, b_ptr, part_ptr, gram_ptr, sq_a_ptr, sq_b_ptr, sigma_ptr, coef_ptr,
                      RA, RB, HW, a_stride_b, a_stride_c, a_W, a_stride_h, a_stride_w,
                      b_stride_b, b_stride_c, b_W, b_stride_h, b_stride_w,
                      num_slots, slot_offset, eps,
                      KERNEL: tl.constexpr, DEGREE: tl.constexpr, NUM_SIGMA: tl.constexpr,
                      SYMMETRIC: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                      SAVE_GRAM: tl.constexpr, STORE_NORMS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_b = tl.cdiv(RB, BLOCK_M)
    ti = tile // tiles_b
    tj = tile % tiles_b
    ra = (ti * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rb = (tj * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    if SYMMETRIC:
        active = tj >= ti
        tile_weight = tl.where(tj > ti, 2.0, tl.where(tj == ti, 1.0, 0.0))
    else:
        active = tj >= 0
        tile_weight = tl.where(active, 1.0, 1.0)
    k_end = tl.where(active, HW, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=part_ptr.dtype.element_ty)
    sq_a = tl.zeros([BLOCK_M], dtype=part_ptr.dtype.element_ty)
    sq_b = tl.zeros([BLOCK_M], dtype=part_ptr.dtype.element_ty)
    a_base = a_ptr + b * a_stride_b
    b_base = b_ptr + b * b_stride_b
    for k0 in range(0, k_end, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < HW
        a_spatial = spatial_offset(k, a_W, a_stride_h, a_stride_w)
        b_spatial = spatial_offset(k, b_W, b_stride_h, b_stride_w)
        a = tl.load(a_base + ra[:, None] * a_stride_c + a_spatial[None, :],
                    mask=(ra < RA)[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_base + rb[None, :] * b_stride_c + b_spatial[:, None],
                     mask=k_ok[:, None] & (rb < RB)[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
        a_up = a.to(acc.dtype)
        b_up = bt.to(acc.dtype)
        sq_a += tl.sum(a_up * a_up, axis=1)
        sq_b += tl.sum(b_up * b_up, axis=0)
    n_a = tl.maximum(tl.sqrt(sq_a), eps)
    n_b = tl.maximum(tl.sqrt(sq_b), eps)
    g = acc / (n_a[:, None] * n_b[None, :])
    if KERNEL == 0:
        phi = g
    elif KERNEL == 1:
        base = g + tl.load(coef_ptr)
        phi = tl.full([BLOCK_M, BLOCK_M], 1.0, dtype=acc.dtype)
        for _ in tl.static_range(DEGREE):
            phi = phi * base
    else:
        rho_a = sq_a / (n_a * n_a)
        rho_b = sq_b / (n_b * n_b)
        # PropagateNan.ALL: a NaN distance (non-finite input) must stay NaN; the default
        # maximum is fmax on a GPU, which returns 0 and gives a finite φ = 1.
        dist = tl.maximum(rho_a[:, None] + rho_b[None, :] - 2.0 * g, 0.0,
                          propagate_nan=tl.PropagateNan.ALL)
        phi = tl.zeros([BLOCK_M, BLOCK_M], dtype=acc.dtype)
        for s in tl.static_range(NUM_SIGMA):
            sigma2 = tl.load(sigma_ptr + b * NUM_SIGMA + s)
            phi += tl.exp(-dist / (2.0 * sigma2))
    valid = (ra < RA)[:, None] & (rb < RB)[None, :]
    if EXCLUDE_DIAG:
        valid = valid & (ra[:, None] != rb[None, :])
    total = tl.sum(tl.sum(tl.where(valid, phi, 0.0), axis=1), axis=0)
    tl.store(part_ptr + b * num_slots + slot_offset + tile, tile_weight * total)
    if SAVE_GRAM:
        limit = tl.where(active, RA, 0)
        out = gram_ptr + b * RA * RB
        tl.store(out + ra[:, None] * RB + rb[None, :], g,
                 mask=(ra < limit)[:, None] & (rb < RB)[None, :])
        if SYMMETRIC:  # mirror the strictly upper tiles (RA == RB)
            mirror = tl.where(tj > ti, RA, 0)
            tl.store(out + rb[None, :] * RB + ra[:, None], g,
                     mask=(ra < mirror)[:, None] & (rb < RB)[None, :])
    if STORE_NORMS:  # the cross block: the first tile column / row own the norms
        tl.store(sq_a_ptr + b * RA + ra, sq_a, mask=(ra < tl.where(tj == 0, RA, 0)))
        tl.store(sq_b_ptr + b * RB + rb, sq_b, mask=(rb < tl.where(ti == 0, RB, 0)))


@triton.jit
def _kernel_slope(g, rho_a, rho_b, sigma_ptr, coef, KERNEL: tl.constexpr, DEGREE: tl.constexpr,
                  NUM_SIGMA: tl.constexpr):
    """φ'(g) of one tile (kernel_slopes in kdfast/reference/nst.py): 1; d(g + c)^(d−1);
    Σ_σ² exp(−dist/(2σ²))/σ² where dist = ρ_a² + ρ_b² − 2g is not < 0, else 0."""
    if KERNEL == 0:
        slope = tl.full(g.shape, 1.0, dtype=g.dtype)
    elif KERNEL == 1:
        slope = tl.full(g.shape, DEGREE, dtype=g.dtype)
        for _ in tl.static_range(DEGREE - 1):
            slope = slope * (g + coef)
    else:
        dist = rho_a[:, None] + rho_b[None, :] - 2.0 * g
        clamped = dist < 0.0  # False for NaN: a NaN distance keeps a NaN slope
        dist = tl.maximum(dist, 0.0, propagate_nan=tl.PropagateNan.ALL)
        slope = tl.zeros(g.shape, dtype=g.dtype)
        for s in tl.static_range(NUM_SIGMA):
            sigma2 = tl.load(sigma_ptr + s)
            slope += tl.exp(-dist / (2.0 * sigma2)) / sigma2
        slope = tl.where(clamped, 0.0, slope)
    return slope


@triton.jit
def _recompute_block(acc, c, xa, inv_a, rho_a, ra, o_ptr, sq_o_ptr, RO, d, d_ok, o_stride_c,
                     o_W, o_stride_h, o_stride_w, sigma_ptr, coef, factor, eps,
                     KERNEL: tl.constexpr,
                     DEGREE: tl.constexpr, NUM_SIGMA: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block's share of a row tile's gradient: over the other rows o_j, recompute
    g = x̂_a·ô_j, the weights w = factor·φ'(g), and add c += Σ_j w g, acc += Σ_j w ô_j."""
    spatial = spatial_offset(d, o_W, o_stride_h, o_stride_w)
    for j0 in range(0, RO, BLOCK_N):
        rj = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        j_ok = rj < RO
        xo = tl.load(o_ptr + rj[:, None] * o_stride_c + spatial[None, :],
                     mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        sq_o = tl.load(sq_o_ptr + rj, mask=j_ok, other=0.0)
        inv_o = 1.0 / tl.maximum(tl.sqrt(sq_o), eps)
        raw = tl.dot(xa, tl.trans(xo), input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        g = raw * inv_a[:, None] * inv_o[None, :]
        slope = _kernel_slope(g, rho_a, sq_o * inv_o * inv_o, sigma_ptr, coef, KERNEL, DEGREE,
                              NUM_SIGMA)
        valid = j_ok[None, :]
        if EXCLUDE_DIAG:
            valid = valid & (ra[:, None] != rj[None, :])
        w = tl.where(valid, slope * factor, 0.0)
        c += tl.sum(w * g, axis=1)
        unit_o = (xo.to(acc.dtype) * inv_o[:, None]).to(xo.dtype)
        acc = tl.dot(w.to(xo.dtype), unit_o, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
    return acc, c


@triton.autotune(configs=_RECOMPUTE_CONFIGS, key=["RA", "RB", "HW"])
@triton.jit
def _mmd_recompute_backward_kernel(a_ptr, b_ptr, da_ptr, sq_a_ptr, sq_b_ptr, sigma_ptr, coef_ptr,
                                   grad_ptr, factor_ptr, RA, RB, HW,
                                   a_stride_b, a_stride_c, a_W, a_stride_h, a_stride_w,
                                   b_stride_b, b_stride_c, b_W, b_stride_h, b_stride_w,
                                   da_stride_b, da_stride_c, da_stride_h, da_stride_w,
                                   KERNEL: tl.constexpr, DEGREE: tl.constexpr,
                                   NUM_SIGMA: tl.constexpr, HAS_SELF: tl.constexpr,
                                   EXCLUDE_DIAG: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """dA for one tile of A's rows, the whole map (HW ≤ BLOCK_D) in registers, with no Gram
    block read from memory: every tile of g is recomputed from the raw features.
    dA_i = s/n_i · (Σ_j W_aa,ij â_j + Σ_j W_ab,ij b̂_j − c_i â_i), c_i = Σ_j W_ij g_ij (0 for
    all-zero rows), W = φ'(g)·(the block's weight), s = g_loss·ref with the weights scaled
    by 1/ref (O(1) before the cast to float16/bfloat16); W_aa + W_aaᵀ = 2 W_aa."""
    b = tl.program_id(0).to(tl.int64)
    ra = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    a_ok = ra < RA
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < HW
    a_spatial = spatial_offset(d, a_W, a_stride_h, a_stride_w)
    xa = tl.load(a_ptr + b * a_stride_b + ra[:, None] * a_stride_c + a_spatial[None, :],
                 mask=a_ok[:, None] & d_ok[None, :], other=0.0)
    eps = tl.load(factor_ptr + 3)  # in the compute dtype (a float argument would be float32)
    sq_a = tl.load(sq_a_ptr + b * RA + ra, mask=a_ok, other=0.0)
    norm_a = tl.sqrt(sq_a)
    inv_a = 1.0 / tl.maximum(norm_a, eps)
    rho_a = sq_a * inv_a * inv_a
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=sq_a_ptr.dtype.element_ty)
    c = tl.zeros([BLOCK_M], dtype=sq_a_ptr.dtype.element_ty)
    coef = tl.load(coef_ptr)
    sigmas = sigma_ptr + b * NUM_SIGMA
    if HAS_SELF:
        acc, c = _recompute_block(acc, c, xa, inv_a, rho_a, ra, a_ptr + b * a_stride_b,
                                  sq_a_ptr + b * RA, RA, d, d_ok, a_stride_c, a_W, a_stride_h,
                                  a_stride_w, sigmas, coef, tl.load(factor_ptr), eps, KERNEL,
                                  DEGREE, NUM_SIGMA, EXCLUDE_DIAG, DOT_PRECISION, BLOCK_N)
    acc, c = _recompute_block(acc, c, xa, inv_a, rho_a, ra, b_ptr + b * b_stride_b,
                              sq_b_ptr + b * RB, RB, d, d_ok, b_stride_c, b_W, b_stride_h,
                              b_stride_w, sigmas, coef, tl.load(factor_ptr + 1), eps, KERNEL,
                              DEGREE, NUM_SIGMA, False, DOT_PRECISION, BLOCK_N)
    c = tl.where(norm_a > eps, c, 0.0)
    unit_a = xa.to(acc.dtype) * inv_a[:, None]
    scale = tl.load(grad_ptr + b) * tl.load(factor_ptr + 2) * inv_a
    grad = (acc - c[:, None] * unit_a) * scale[:, None]
    da_spatial = spatial_offset(d, a_W, da_stride_h, da_stride_w)
    tl.store(da_ptr + b * da_stride_b + ra[:, None] * da_stride_c + da_spatial[None, :],
             grad.to(da_ptr.dtype.element_ty), mask=a_ok[:, None] & d_ok[None, :])


@triton.jit
def _row_sq_kernel(x_ptr, out_ptr, R, HW, stride_b, stride_c, W, stride_h, stride_w,
                   BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, HW, BLOCK_HW):
        k = (k0 + tl.arange(0, BLOCK_HW)).to(tl.int64)
        spatial = spatial_offset(k, W, stride_h, stride_w)
        x = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_c + spatial[None, :],
                    mask=(rows < R)[:, None] & (k < HW)[None, :], other=0.0).to(acc.dtype)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + b * R + rows, acc, mask=rows < R)


@triton.jit
def _unit_rows_sum(x_ptr, sq_ptr, R, k, k_ok, stride_c, W, stride_h, stride_w, acc, eps,
                   BLOCK_R: tl.constexpr):
    """acc[k] += Σ_rows x[row, k] / max(‖x_row‖, eps)."""
    spatial = spatial_offset(k, W, stride_h, stride_w)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rows < R
        norm = tl.maximum(tl.sqrt(tl.load(sq_ptr + rows, mask=r_ok, other=1.0)), eps)
        x = tl.load(x_ptr + rows[:, None] * stride_c + spatial[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(acc.dtype)
        acc += tl.sum(x / norm[:, None], axis=0)
    return acc


@triton.jit
def _unit_sum_kernel(x_ptr, y_ptr, sqx_ptr, sqy_ptr, sums_ptr, part_ptr, M, N, HW, num_slots,
                     x_stride_b, x_stride_c, x_W, x_stride_h, x_stride_w,
                     y_stride_b, y_stride_c, y_W, y_stride_h, y_stride_w, eps,
                     BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """S_x = Σ_i x̂_i and S_y = Σ_j ŷ_j for one HW block: stored (B, 2, HW) and reduced to the
    per-program partials ‖S_x‖², ‖S_y‖², S_x·S_y (slots (B, 3, num_slots))."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    k = (blk * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
    k_ok = k < HW
    zero = tl.zeros([BLOCK_HW], dtype=part_ptr.dtype.element_ty)
    sum_x = _unit_rows_sum(x_ptr + b * x_stride_b, sqx_ptr + b * M, M, k, k_ok, x_stride_c, x_W,
                           x_stride_h, x_stride_w, zero, eps, BLOCK_R)
    sum_y = _unit_rows_sum(y_ptr + b * y_stride_b, sqy_ptr + b * N, N, k, k_ok, y_stride_c, y_W,
                           y_stride_h, y_stride_w, zero, eps, BLOCK_R)
    tl.store(sums_ptr + b * 2 * HW + k, sum_x, mask=k_ok)
    tl.store(sums_ptr + (b * 2 + 1) * HW + k, sum_y, mask=k_ok)
    slot = part_ptr + b * 3 * num_slots + blk
    tl.store(slot, tl.sum(sum_x * sum_x, axis=0))
    tl.store(slot + num_slots, tl.sum(sum_y * sum_y, axis=0))
    tl.store(slot + 2 * num_slots, tl.sum(sum_x * sum_y, axis=0))


@triton.jit
def _linear_backward_kernel(x_ptr, dx_ptr, v_ptr, inv_ptr, inv3_ptr, R, HW,
                            stride_b, stride_c, W, stride_h, stride_w,
                            dx_stride_b, dx_stride_c, dx_stride_h, dx_stride_w,
                            BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx_i = v/n_i − (v·x_i) x_i/n_i³ (the F.normalize backward of dL/dx̂_i = v, the same
    vector for every row), with 1/n_i and 1/n_i³ precomputed (1/n³ = 0 for rows with
    ‖x_i‖ ≤ eps, which F.normalize does not project). Reads X twice, writes dX once."""
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = rows < R
    inv = tl.load(inv_ptr + b * R + rows, mask=r_ok, other=0.0)
    inv3 = tl.load(inv3_ptr + b * R + rows, mask=r_ok, other=0.0)
    along = tl.zeros([BLOCK_R], dtype=inv_ptr.dtype.element_ty)
    for k0 in range(0, HW, BLOCK_HW):
        k = (k0 + tl.arange(0, BLOCK_HW)).to(tl.int64)
        k_ok = k < HW
        v = tl.load(v_ptr + b * HW + k, mask=k_ok, other=0.0)
        x = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_c
                    + spatial_offset(k, W, stride_h, stride_w)[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(v.dtype)
        along += tl.sum(x * v[None, :], axis=1)
    radial = along * inv3
    for k0 in range(0, HW, BLOCK_HW):
        k = (k0 + tl.arange(0, BLOCK_HW)).to(tl.int64)
        k_ok = k < HW
        mask = r_ok[:, None] & k_ok[None, :]
        v = tl.load(v_ptr + b * HW + k, mask=k_ok, other=0.0)
        x = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_c
                    + spatial_offset(k, W, stride_h, stride_w)[None, :],
                    mask=mask, other=0.0).to(v.dtype)
        grad = v[None, :] * inv[:, None] - radial[:, None] * x
        tl.store(dx_ptr + b * dx_stride_b + rows[:, None] * dx_stride_c
                 + spatial_offset(k, W, dx_stride_h, dx_stride_w)[None, :],
                 grad.to(dx_ptr.dtype.element_ty), mask=mask)


def _row_squares(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch, rows = x.shape[:2]
    out = torch.empty(batch, rows, dtype=dtype, device=x.device)
    _row_sq_kernel[(batch, triton.cdiv(rows, _ROW_BLOCK))](
        x, out, rows, x.shape[2] * x.shape[3], *feature_view(x), BLOCK_R=_ROW_BLOCK,
        BLOCK_HW=_HW_BLOCK)
    return out


def _unit_rho2(sq: torch.Tensor) -> torch.Tensor:
    """ρ² = ‖x̂‖² = r²/max(r, eps)²: 1 for a live channel, 0 for an all-zero one."""
    return sq / sq.sqrt().clamp_min(NORM_EPS).pow(2)


def unit_sums(x: torch.Tensor, y: torch.Tensor):
    """Squared row norms (sq_x (B, m), sq_y (B, n)), the sums S = [Σ x̂_i; Σ ŷ_j] (B, 2, D) and
    the per-sample ‖S_x‖², ‖S_y‖², S_x·S_y (B, 3): three O(C·D) passes, no Gram."""
    dtype = accumulation_dtype(x.dtype)
    sq_x, sq_y = _row_squares(x, dtype), _row_squares(y, dtype)
    batch, m = x.shape[:2]
    n, hw = y.shape[1], x.shape[2] * x.shape[3]
    slots = triton.cdiv(hw, _HW_BLOCK)
    sums = torch.empty(batch, 2, hw, dtype=dtype, device=x.device)
    parts = torch.empty(batch, 3, slots, dtype=dtype, device=x.device)
    _unit_sum_kernel[(batch, slots)](x, y, sq_x, sq_y, sums, parts, m, n, hw, slots,
                                     *feature_view(x), *feature_view(y), NORM_EPS,
                                     BLOCK_R=_ROW_BLOCK, BLOCK_HW=_HW_BLOCK)
    return (sq_x, sq_y), sums, parts.sum(dim=2)


@torch.no_grad()
def mean_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """σ² = mean ‖ẑ_i − ẑ_j‖² over distinct rows of [X̂; Ŷ] per sample, (B,), in O(C·D):
    2N Σ ρ² − 2 ‖Σ ẑ‖² over N(N − 1), with ‖Σ ẑ‖² = ‖S_x‖² + ‖S_y‖² + 2 S_x·S_y."""
    (sq_x, sq_y), _, products = unit_sums(x, y)
    rows = x.shape[1] + y.shape[1]
    sq_norms = _unit_rho2(sq_x).sum(1) + _unit_rho2(sq_y).sum(1)
    total_sum = products[:, 0] + products[:, 1] + 2 * products[:, 2]
    total = 2 * rows * sq_norms - 2 * total_sum
    return (total / (rows * (rows - 1))).clamp_min(NORM_EPS)


def _within_divisor(rows: int, unbiased: bool) -> int:
    return rows * (rows - 1) if unbiased else rows * rows


def linear_mmd_forward(x, y, unbiased: bool, teacher_term: bool):
    """Linear kernel without a Gram (docs/design.md): Σ_ij x̂_iᵀŷ_j = S_xᵀS_y, so
    MMD² = (‖S_x‖² [− Σρ²])/d_x − 2 S_x·S_y/(mn) + (‖S_y‖² [− Σρ²])/d_y, d = m² or m(m − 1).

    Returns (MMD² (B,), sq_x (B, m), sq_y (B, n), S = [S_x; S_y] (B, 2, D)).
    """
    (sq_x, sq_y), sums, products = unit_sums(x, y)
    m, n = x.shape[1], y.shape[1]
    within_x = products[:, 0] - (_unit_rho2(sq_x).sum(1) if unbiased else 0)
    loss = within_x / _within_divisor(m, unbiased) - 2 * products[:, 2] / (m * n)
    if teacher_term:
        within_y = products[:, 1] - (_unit_rho2(sq_y).sum(1) if unbiased else 0)
        loss = loss + within_y / _within_divisor(n, unbiased)
    return loss, sq_x, sq_y, sums


def linear_mmd_backward(grad_loss, x, y, sq_x, sq_y, sums, unbiased: bool, teacher_term: bool,
                        need_x: bool, need_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx̂_i = g(2 S_x/d_x − 2 S_y/(mn)) is one D-vector per sample; one kernel per input
    applies the normalisation backward (the ρ terms have no gradient: ‖x̂_i‖ ∈ {0, 1})."""
    m, n = x.shape[1], y.shape[1]
    g = grad_loss.to(sums.dtype).view(-1, 1)
    sum_x, sum_y = sums[:, 0], sums[:, 1]
    dx, dy = x.new_empty(0), y.new_empty(0)
    if need_x:
        v = g * (2 * sum_x / _within_divisor(m, unbiased) - 2 * sum_y / (m * n))
        dx = _linear_input_grad(x, v, sq_x)
    if need_y:
        v = -2 * g * sum_x / (m * n)
        if teacher_term:
            v = v + 2 * g * sum_y / _within_divisor(n, unbiased)
        dy = _linear_input_grad(y, v, sq_y)
    return dx, dy


def _linear_input_grad(x: torch.Tensor, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    batch, rows = x.shape[:2]
    norm = sq.sqrt()
    # eps applied here, in the compute dtype: a Python float argument reaches a kernel as fp32
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    inv3 = torch.where(norm > NORM_EPS, inv.pow(3), torch.zeros_like(inv))
    grad = torch.empty_like(x)
    _linear_backward_kernel[(batch, triton.cdiv(rows, _ROW_BLOCK))](
        x, grad, v.contiguous(), inv, inv3, rows, x.shape[2] * x.shape[3], *feature_view(x),
        grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        BLOCK_R=_ROW_BLOCK, BLOCK_HW=_HW_BLOCK)
    return grad


def _sigma_table(sigma2, x, y, batch, dtype) -> torch.Tensor:
    """(B, S) σ² values per sample: the list broadcast, or the per-sample ``"mean"``."""
    bandwidths = as_bandwidths(sigma2)
    if bandwidths == "mean":
        return mean_bandwidth(x, y).to(dtype).view(batch, 1).contiguous()
    values = torch.tensor(bandwidths, dtype=dtype, device=x.device)
    return values.view(1, -1).expand(batch, -1).contiguous()


def mmd_forward(x, y, kernel, degree, coef, sigma2, unbiased, teacher_term,
                save_grams=frozenset()):
    """(MMD² (B,), the normalised Gram blocks named in ``save_grams`` ("ss", "st", "tt"),
    squared row norms (sq_x, sq_y), σ² table (B, S))."""
    batch, m = x.shape[:2]
    n, hw = y.shape[1], x.shape[2] * x.shape[3]
    dtype = accumulation_dtype(x.dtype)
    device = x.device
    sigmas = (_sigma_table(sigma2, x, y, batch, dtype) if kernel == "rbf"
              else torch.ones(batch, 1, dtype=dtype, device=device))
    min_block = min(c.kwargs["BLOCK_M"] for c in _MMD_CONFIGS)
    blocks = [("ss", x, x, m, m, True, (1.0 / (m * (m - 1)) if unbiased else 1.0 / m**2)),
              ("st", x, y, m, n, False, -2.0 / (m * n))]
    if teacher_term:
        blocks.append(("tt", y, y, n, n, True, (1.0 / (n * (n - 1)) if unbiased else 1.0 / n**2)))
    slot_counts = [triton.cdiv(ra, min_block) * triton.cdiv(rb, min_block)
                   for _, _, _, ra, rb, _, _ in blocks]
    parts = torch.zeros(batch, sum(slot_counts), dtype=dtype, device=device)
    coef_arg = torch.tensor([coef], dtype=dtype, device=device)
    sq_x = torch.empty(batch, m, dtype=dtype, device=device)
    sq_y = torch.empty(batch, n, dtype=dtype, device=device)
    grams = {}
    offset = 0
    for (name, a, b, ra, rb, symmetric, _), count in zip(blocks, slot_counts, strict=True):
        save = name in save_grams
        gram = torch.empty(batch, ra, rb, dtype=dtype, device=device) if save else parts
        if save:
            grams[name] = gram
        grid = lambda meta, ra=ra, rb=rb: (batch, triton.cdiv(ra, meta["BLOCK_M"])  # noqa: E731
                                           * triton.cdiv(rb, meta["BLOCK_M"]))
        _mmd_block_kernel[grid](
            a, b, parts, gram, sq_x, sq_y, sigmas, coef_arg, ra, rb, hw, *feature_view(a),
            *feature_view(b), parts.shape[1], offset, NORM_EPS,
            KERNEL=_KERNELS[kernel], DEGREE=int(degree), NUM_SIGMA=sigmas.shape[1],
            SYMMETRIC=symmetric, EXCLUDE_DIAG=symmetric and unbiased, SAVE_GRAM=save,
            STORE_NORMS=name == "st", DOT_PRECISION=dot_precision(x.dtype))
        offset += count
    loss = sum(weight * block.sum(dim=1) for (*_, weight), block
               in zip(blocks, parts.split(slot_counts, dim=1), strict=True))
    return loss, grams, (sq_x, sq_y), sigmas


def _gram_weights(grams, sq_x, sq_y, grad_loss, kernel, degree, coef, sigmas, unbiased):
    """W = ∂(g · MMD²)/∂g for each block in ``grams`` (B·C² work, closed form): the block's
    sign and mean weight times φ'(g) (:func:`kernel_slopes`), the diagonal zero where the
    unbiased estimator leaves it out."""
    rho_x, rho_y = _unit_rho2(sq_x), _unit_rho2(sq_y)
    rho = {"ss": (rho_x, rho_x), "st": (rho_x, rho_y), "tt": (rho_y, rho_y)}
    bandwidths = sigmas if kernel == "rbf" else ()
    g = grad_loss.to(sq_x.dtype).view(-1, 1, 1)
    weights = {}
    for name, gram in grams.items():
        rows, cols = gram.shape[1:]
        exclude = unbiased and name != "st"
        scale = (-2.0 if name == "st" else 1.0) / (rows * (rows - 1) if exclude else rows * cols)
        weights[name] = kernel_slopes(gram, *rho[name], kernel, degree, coef,
                                      bandwidths) * (g * scale)
        if exclude:
            weights[name].diagonal(dim1=1, dim2=2).zero_()
    return weights


def _input_weights(sym, cross, g_self, g_cross, norm_self, norm_other, live):
    """(M_self, M_other) of d(rows) = M_self·rows + M_other·other_rows (normalisation folded)."""
    c = (sym * g_self).sum(2) + (cross * g_cross).sum(2)
    c = torch.where(live, c, torch.zeros_like(c))
    m_self = sym / (norm_self.unsqueeze(2) * norm_self.unsqueeze(1))
    m_self = m_self - torch.diag_embed(c / norm_self.pow(2))
    m_other = cross / (norm_self.unsqueeze(2) * norm_other.unsqueeze(1))
    return m_self, m_other


def channel_mmd_forward(x, y, kernel: str, degree: int, coef: float, sigma2, unbiased: bool,
                        teacher_term: bool, need_x: bool, need_y: bool):
    """(MMD² (B,), sq_x, sq_y, σ² table, G_ss, G_st, G_tt): the normalised Gram blocks the
    backward needs — dX needs ss and st, dY st and tt (B·C² each) — unless it recomputes them
    (small maps); the others are (B, 0, 0): an output whose rank changed with the options
    would trip Inductor's fallback for custom operators."""
    save = kept_gram_blocks(x, need_x, need_y, teacher_term)
    loss, grams, (sq_x, sq_y), sigmas = mmd_forward(x, y, kernel, degree, coef, sigma2,
                                                    unbiased, teacher_term, save)
    return (loss, sq_x, sq_y, sigmas,
            *(grams[name] if name in grams else sq_x.new_empty(x.shape[0], 0, 0)
              for name in ("ss", "st", "tt")))


def channel_mmd_backward(grad_loss, x, y, sq_x, sq_y, sigmas, g_ss, g_st, g_tt, kernel: str,
                         degree: int, coef: float, unbiased: bool, teacher_term: bool,
                         need_x: bool, need_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX, dY) from the blocks :func:`channel_mmd_forward` saved (empty where not needed),
    or, on small maps, from tiles recomputed by ``_mmd_recompute_backward_kernel``."""
    if recomputes_grams(x):
        return _recomputed_input_grads(grad_loss, x, y, sq_x, sq_y, sigmas, kernel, degree,
                                       coef, unbiased, teacher_term, need_x, need_y)
    grams = {"st": g_st}
    if need_x:
        grams["ss"] = g_ss
    if need_y and teacher_term:
        grams["tt"] = g_tt
    w = _gram_weights(grams, sq_x, sq_y, grad_loss, kernel, degree, coef, sigmas, unbiased)
    norm_x, norm_y = sq_x.sqrt(), sq_y.sqrt()
    live_x, live_y = norm_x > NORM_EPS, norm_y > NORM_EPS
    norm_x, norm_y = norm_x.clamp_min(NORM_EPS), norm_y.clamp_min(NORM_EPS)
    dx, dy = x.new_empty(0), y.new_empty(0)
    if need_x:
        sym = w["ss"] + w["ss"].transpose(1, 2)
        m_xx, m_xy = _input_weights(sym, w["st"], grams["ss"], grams["st"], norm_x, norm_y,
                                    live_x)
        dx = rows_gemm(torch.empty_like(x), m_xx, x, m_xy, y)
    if need_y:
        sym = (w["tt"] + w["tt"].transpose(1, 2) if "tt" in w
               else torch.zeros_like(w["st"][:, :1, :1]).expand(-1, y.shape[1], y.shape[1]))
        g_tt = grams.get("tt", sym)
        m_yy, m_yx = _input_weights(sym, w["st"].transpose(1, 2), g_tt,
                                    grams["st"].transpose(1, 2), norm_y, norm_x, live_y)
        dy = rows_gemm(torch.empty_like(y), m_yy, y, m_yx, x)
    return dx, dy


def _recomputed_input_grads(grad_loss, x, y, sq_x, sq_y, sigmas, kernel, degree, coef,
                            unbiased, teacher_term, need_x, need_y):
    m, n = x.shape[1], y.shape[1]
    cross = -2.0 / (m * n)
    dx, dy = x.new_empty(0), y.new_empty(0)
    if need_x:
        dx = _recomputed_input_grad(x, y, sq_x, sq_y, sigmas, grad_loss, kernel, degree, coef,
                                    1.0 / _within_divisor(m, unbiased), cross, unbiased)
    if need_y:
        self_weight = 1.0 / _within_divisor(n, unbiased) if teacher_term else None
        dy = _recomputed_input_grad(y, x, sq_y, sq_x, sigmas, grad_loss, kernel, degree, coef,
                                    self_weight, cross, unbiased)
    return dx, dy


def _recomputed_input_grad(a, b, sq_a, sq_b, sigmas, grad_loss, kernel, degree, coef,
                           self_weight, cross_weight, unbiased) -> torch.Tensor:
    """dA for the rows A with self block weight ``self_weight`` (None: no self block) and
    cross block weight ``cross_weight``; the factors and eps passed in a tensor (a Python
    float argument would reach the kernel as float32)."""
    batch, rows = a.shape[:2]
    hw = a.shape[2] * a.shape[3]
    dtype = sq_a.dtype
    ref = max(abs(self_weight or 0.0), abs(cross_weight))
    factors = torch.tensor([2.0 * (self_weight or 0.0) / ref, cross_weight / ref, ref,
                            NORM_EPS], dtype=dtype, device=a.device)
    grad = torch.empty_like(a)
    grid = lambda meta: (batch, triton.cdiv(rows, meta["BLOCK_M"]))  # noqa: E731
    _mmd_recompute_backward_kernel[grid](
        a, b, grad, sq_a, sq_b, sigmas, torch.tensor([coef], dtype=dtype, device=a.device),
        grad_loss.to(dtype).contiguous(), factors, rows, b.shape[1], hw, *feature_view(a),
        *feature_view(b), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        KERNEL=_KERNELS[kernel], DEGREE=int(degree), NUM_SIGMA=sigmas.shape[1],
        HAS_SELF=self_weight is not None, EXCLUDE_DIAG=unbiased,
        DOT_PRECISION=dot_precision(a.dtype), BLOCK_D=max(16, triton.next_power_of_2(hw)))
    return grad

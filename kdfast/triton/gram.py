r"""Triton batch-Gram cores: SP (``"similarity"``) and FSP (``"fsp"``), their
backwards run the GEMM kernel of :mod:`kdfast.triton._gemm`.

SP (docs/design.md, "Batch Gram"), Q the features flattened to B × D per network:

* ``_sp_gram_kernel``, grid (upper tiles of A, split, network): A = QQᵀ split-K over D, both
  networks in one launch; each program writes its partial tile (and the mirrored tile) into
  its own split slot, so nothing is accumulated with atomics.
* ``_sp_rows_kernel``, grid (B,): sums the split slots in a fixed order, row-normalises A_s
  and A_t (``F.normalize``, eps 1e-12) and reduces Σ_j (G_t − G_s)²_ij / B: the per-row loss.
* backward: dA from the B × B matrices (tiny, closed form), then dQ = (dA + dAᵀ) Q in one
  ``rows_gemm`` launch per network.

FSP, per sample G = X_a X_bᵀ / HW:

* ``_fsp_kernel``, grid (B, C_a tiles × C_b tiles): both Grams of a tile over their own HW,
  the difference G_s − G_t (kept, B·C_a·C_b, for the backward) and the tile's Σ diff².
* backward: dG = 2 g (G_s − G_t)/(C_a C_b), then dX_a = dG X_b / HW and dX_b = dGᵀ X_a / HW,
  each one ``rows_gemm`` launch (dGᵀ through strides, no copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast._precision import accumulation_dtype, vector_norm
from kdfast.triton._common import (
    NORM_EPS,
    configs,
    dot_precision,
    feature_view,
    overflowed,
    spatial_offset,
)
from kdfast.triton._gemm import rows_gemm

_GRAM_TUNED = [{"BLOCK_M": m, "BLOCK_K": k, "num_warps": w, "num_stages": s}
               for m, k, w, s in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3),
                                  (32, 128, 4, 4), (128, 32, 4, 4)]]
_GRAM_CONFIGS = configs({"BLOCK_M": 16, "BLOCK_K": 16}, _GRAM_TUNED)
_FSP_TUNED = [{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w,
               "num_stages": s}
              for m, n, k, w, s in [(64, 64, 64, 4, 3), (128, 64, 32, 4, 3),
                                    (64, 128, 32, 4, 3), (32, 32, 128, 4, 4),
                                    (128, 128, 32, 8, 3)]]
_FSP_CONFIGS = configs({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, _FSP_TUNED)
SP_SPLITS_GPU = 8
SP_SPLITS_CPU = 1  # the interpreter; tests raise it to run the split-K path


# ---------------------------------------------------------------------------------------------
# SP


# A = Q Qᵀ (B × B) for one network, one upper tile and one D-slice: a split-K partial written
# to its own slot (and mirrored below the diagonal), summed later in a fixed order.
@triton.autotune(configs=_GRAM_CONFIGS, key=["B", "D_s", "D_t"])
@triton.jit
def _sp_gram_kernel(s_ptr, t_ptr, part_ptr, B, D_s, D_t, SPLITS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles = tl.cdiv(B, BLOCK_M)
    ti = tl.program_id(0) // tiles
    tj = tl.program_id(0) % tiles
    split = tl.program_id(1)
    net = tl.program_id(2)
    if net == 0:  # noqa: SIM108  (a runtime branch: Triton has no runtime ternary)
        base = s_ptr
    else:
        base = t_ptr
    depth = tl.where(net == 0, D_s, D_t).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(depth, SPLITS), BLOCK_K) * BLOCK_K
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, depth)
    k_hi = tl.where(tj >= ti, k_hi, k_lo)  # lower tiles come from the mirrored upper ones
    ri = (ti * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rj = (tj * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=part_ptr.dtype.element_ty)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        a = tl.load(base + ri[:, None] * depth + k[None, :],
                    mask=(ri < B)[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(base + k[:, None] + rj[None, :] * depth,
                     mask=k_ok[:, None] & (rj < B)[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
    slot = part_ptr + (net * SPLITS + split).to(tl.int64) * B * B
    upper = tl.where(tj >= ti, B, 0)  # row limit: 0 masks the whole (lower) tile off
    tl.store(slot + ri[:, None] * B + rj[None, :], acc,
             mask=(ri < upper)[:, None] & (rj < B)[None, :])
    # The mirror only off the diagonal tiles: two stores to one address would race.
    strictly_upper = tl.where(tj > ti, B, 0)
    tl.store(slot + rj[None, :] * B + ri[:, None], acc,
             mask=(ri < strictly_upper)[:, None] & (rj < B)[None, :])


@triton.jit
def _summed_gram_rows(part_ptr, i, j, ok, B, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Row i, columns j of A_s and A_t: their SPLITS partial slots summed in a fixed order."""
    a_s = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    a_t = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for split in range(SPLITS):
        a_s += tl.load(part_ptr + split * B * B + i * B + j, mask=ok, other=0.0)
        a_t += tl.load(part_ptr + (SPLITS + split) * B * B + i * B + j, mask=ok, other=0.0)
    return a_s, a_t


@triton.jit
def _rescaled_row_norms(part_ptr, i, B, n_s, n_t, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Row i's norms of A_s and A_t as peak · ‖a / peak‖ where the plain one overflowed."""
    peak_s = tl.zeros([BLOCK], dtype=n_s.dtype)
    peak_t = tl.zeros([BLOCK], dtype=n_s.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        a_s, a_t = _summed_gram_rows(part_ptr, i, j, j < B, B, SPLITS, BLOCK)
        peak_s = tl.maximum(peak_s, tl.abs(a_s))
        peak_t = tl.maximum(peak_t, tl.abs(a_t))
    top_s = tl.max(peak_s, axis=0)
    top_t = tl.max(peak_t, axis=0)
    sq_s = tl.zeros([BLOCK], dtype=n_s.dtype)
    sq_t = tl.zeros([BLOCK], dtype=n_s.dtype)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        a_s, a_t = _summed_gram_rows(part_ptr, i, j, j < B, B, SPLITS, BLOCK)
        sq_s += (a_s / top_s) * (a_s / top_s)
        sq_t += (a_t / top_t) * (a_t / top_t)
    n_s = tl.where(overflowed(n_s), top_s * tl.sqrt(tl.sum(sq_s, axis=0)), n_s)
    n_t = tl.where(overflowed(n_t), top_t * tl.sqrt(tl.sum(sq_t, axis=0)), n_t)
    return n_s, n_t


# Row i: a = Σ_splits A[i, :] per network, G = a / max(‖a‖, eps), loss_i = Σ_j (G_t − G_s)²/B.
@triton.jit
def _sp_rows_kernel(part_ptr, gram_ptr, loss_ptr, B, eps, SPLITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    sq_s = tl.zeros([BLOCK], dtype=loss_ptr.dtype.element_ty)
    sq_t = tl.zeros([BLOCK], dtype=loss_ptr.dtype.element_ty)
    for j0 in range(0, B, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < B
        a_s, a_t = _summed_gram_rows(part_ptr, i, j, ok, B, SPLITS, BLOCK)
        tl.store(gram_ptr + i * B + j, a_s, mask=ok)
        tl.store(gram_ptr + B * B + i * B + j, a_t, mask=ok)
        sq_s += a_s * a_s
        sq_t += a_t * a_t
    n_s = tl.sqrt(tl.sum(sq_s, axis=0))
    n_t = tl.sqrt(tl.sum(sq_t, axis=0))
    if overflowed(n_s) | overflowed(n_t):  # Σ a² overflowed for finite a: peak · ‖a/peak‖
        n_s, n_t = _rescaled_row_norms(part_ptr, i, B, n_s, n_t, SPLITS, BLOCK)
    n_s = tl.maximum(n_s, eps)
    n_t = tl.maximum(n_t, eps)
    total = tl.zeros([BLOCK], dtype=loss_ptr.dtype.element_ty)
    for j0 in range(0, B, BLOCK):  # re-sums the slots (read-only) instead of re-reading stores
        j = j0 + tl.arange(0, BLOCK)
        ok = j < B
        a_s, a_t = _summed_gram_rows(part_ptr, i, j, ok, B, SPLITS, BLOCK)
        diff = a_t / n_t - a_s / n_s
        total += diff * diff
    tl.store(loss_ptr + i, tl.sum(total, axis=0) / B)


def similarity_forward(student: torch.Tensor, teacher: torch.Tensor):
    """(per-row loss (B,), raw Grams A (2, B, B): [A_s, A_t]) in the compute dtype."""
    batch = student.shape[0]
    dtype = accumulation_dtype(student.dtype)
    splits = SP_SPLITS_CPU if student.device.type == "cpu" else SP_SPLITS_GPU
    parts = torch.empty(2, splits, batch, batch, dtype=dtype, device=student.device)
    d_s, d_t = student.numel() // batch, teacher.numel() // batch
    grid = lambda meta: (triton.cdiv(batch, meta["BLOCK_M"]) ** 2, splits, 2)  # noqa: E731
    _sp_gram_kernel[grid](student, teacher, parts, batch, d_s, d_t, SPLITS=splits,
                          DOT_PRECISION=dot_precision(student.dtype))
    grams = torch.empty(2, batch, batch, dtype=dtype, device=student.device)
    loss = torch.empty(batch, dtype=dtype, device=student.device)
    block = min(triton.next_power_of_2(batch), 1024)
    _sp_rows_kernel[(batch,)](parts, grams, loss, batch, NORM_EPS, SPLITS=splits, BLOCK=block)
    return loss, grams


def similarity_gram_grads(grams: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """dL/dA (2, B, B) for the raw Grams A = [A_s, A_t], B × B work.

    L_i = Σ_j (G_t − G_s)²_ij / B with G = A / n row-wise, n = max(‖a_i‖, eps): dL/dG_t =
    −dL/dG_s = 2 g_i (G_t − G_s)/B, and F.normalize's backward dA = dG/n − [‖a‖ ≥ eps]
    G (G·dG)/n per row (torch's subgradient: clamp passes the gradient where ‖a‖ ≥ eps).
    """
    norms = vector_norm(grams, dim=2, keepdim=True)  # finite where Σ a² overflows
    clamped = norms.clamp_min(NORM_EPS)
    unit = grams / clamped
    diff = unit[1] - unit[0]
    d_t = diff * (2.0 / grams.shape[1]) * grad_loss.to(grams.dtype).view(-1, 1)
    d_unit = torch.stack((-d_t, d_t))
    along = (unit * d_unit).sum(dim=2, keepdim=True)
    return (d_unit - torch.where(norms >= NORM_EPS, unit * along, 0.0)) / clamped


def _flat_rows_backward(grad_gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dQ = (dA + dAᵀ) Q for Q = x flattened to (B, D), written in x's dtype and layout."""
    depth = x.numel() // x.shape[0]
    out = torch.empty_like(x)
    sym = (grad_gram + grad_gram.t()).unsqueeze(0)
    view = (0, depth, depth, 0, 1)  # one "sample" of B rows of D flat elements
    rows_gemm(out, sym, x, z_view=view, out_view=view)
    return out


def similarity_backward(grad_loss, student, teacher, grams, need_student: bool,
                        need_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dQ_s, dQ_t) for row-dense ``student``/``teacher`` (an empty tensor where not needed)."""
    grad = similarity_gram_grads(grams, grad_loss)
    return (_flat_rows_backward(grad[0], student) if need_student else student.new_empty(0),
            _flat_rows_backward(grad[1], teacher) if need_teacher else teacher.new_empty(0))


# ---------------------------------------------------------------------------------------------
# FSP


@triton.jit
def _tile_gram(a_ptr, b_ptr, rows_a, rows_b, ra, rb, HW,
               a_stride_c, a_W, a_stride_h, a_stride_w, b_stride_c, b_W, b_stride_h, b_stride_w,
               acc, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += X_a[ra, :] X_b[rb, :]ᵀ over the HW spatial positions (strided, int64)."""
    for k0 in range(0, HW, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < HW
        a_spatial = spatial_offset(k, a_W, a_stride_h, a_stride_w)
        b_spatial = spatial_offset(k, b_W, b_stride_h, b_stride_w)
        a = tl.load(a_ptr + ra[:, None] * a_stride_c + a_spatial[None, :],
                    mask=(ra < rows_a)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rb[None, :] * b_stride_c + b_spatial[:, None],
                    mask=k_ok[:, None] & (rb < rows_b)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION,
                     out_dtype=acc.dtype)
    return acc


# One (C_a, C_b) tile of sample b: G = X_a X_bᵀ / HW for student and teacher (each over its
# own HW), D = G_s − G_t kept for the backward, and the tile's Σ D² (mean taken by the host).
@triton.autotune(configs=_FSP_CONFIGS, key=["CA", "CB", "HW_s", "HW_t"])
@triton.jit
def _fsp_kernel(sa_ptr, sb_ptr, ta_ptr, tb_ptr, diff_ptr, part_ptr, CA, CB, HW_s, HW_t,
                num_slots,
                sa_stride_b, sa_stride_c, sa_W, sa_stride_h, sa_stride_w,
                sb_stride_b, sb_stride_c, sb_W, sb_stride_h, sb_stride_w,
                ta_stride_b, ta_stride_c, ta_W, ta_stride_h, ta_stride_w,
                tb_stride_b, tb_stride_c, tb_W, tb_stride_h, tb_stride_w,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_b = tl.cdiv(CB, BLOCK_N)
    ra = ((tile // tiles_b) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rb = ((tile % tiles_b) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=diff_ptr.dtype.element_ty)
    g_s = _tile_gram(sa_ptr + b * sa_stride_b, sb_ptr + b * sb_stride_b, CA, CB, ra, rb, HW_s,
                     sa_stride_c, sa_W, sa_stride_h, sa_stride_w,
                     sb_stride_c, sb_W, sb_stride_h, sb_stride_w, zero, DOT_PRECISION, BLOCK_K)
    g_t = _tile_gram(ta_ptr + b * ta_stride_b, tb_ptr + b * tb_stride_b, CA, CB, ra, rb, HW_t,
                     ta_stride_c, ta_W, ta_stride_h, ta_stride_w,
                     tb_stride_c, tb_W, tb_stride_h, tb_stride_w, zero, DOT_PRECISION, BLOCK_K)
    diff = g_s / HW_s - g_t / HW_t  # integer divisors: exact scaling in float64 too
    mask = (ra < CA)[:, None] & (rb < CB)[None, :]
    tl.store(diff_ptr + b * CA * CB + ra[:, None] * CB + rb[None, :], diff, mask=mask)
    sq = tl.where(mask, diff * diff, 0.0)
    tl.store(part_ptr + b * num_slots + tile, tl.sum(tl.sum(sq, axis=1), axis=0))


def fsp_forward(sa, sb, ta, tb):
    """(per-sample loss (B,), G_s − G_t (B, C_a, C_b)) in the compute dtype."""
    batch, ca = sa.shape[:2]
    cb = sb.shape[1]
    dtype = accumulation_dtype(sa.dtype)
    diff = torch.empty(batch, ca, cb, dtype=dtype, device=sa.device)
    min_m = min(c.kwargs["BLOCK_M"] for c in _FSP_CONFIGS)
    min_n = min(c.kwargs["BLOCK_N"] for c in _FSP_CONFIGS)
    slots = triton.cdiv(ca, min_m) * triton.cdiv(cb, min_n)
    parts = torch.zeros(batch, slots, dtype=dtype, device=sa.device)
    hw_s, hw_t = sa.shape[2] * sa.shape[3], ta.shape[2] * ta.shape[3]
    grid = lambda meta: (batch, triton.cdiv(ca, meta["BLOCK_M"])  # noqa: E731
                         * triton.cdiv(cb, meta["BLOCK_N"]))
    _fsp_kernel[grid](sa, sb, ta, tb, diff, parts, ca, cb, hw_s, hw_t, slots,
                      *feature_view(sa), *feature_view(sb), *feature_view(ta),
                      *feature_view(tb), DOT_PRECISION=dot_precision(sa.dtype))
    return parts.sum(dim=1) / (ca * cb), diff


def fsp_backward(grad_loss, sa, sb, ta, tb, diff, needs) -> tuple[torch.Tensor, ...]:
    """(dS_a, dS_b, dT_a, dT_b): dG = 2 g (G_s − G_t)/(C_a C_b), dX_a = ±dG X_b / HW and
    dX_b = ±dGᵀ X_a / HW, one ``rows_gemm`` each (an empty tensor where ``needs`` is False)."""
    grad_gram = diff * (2.0 / max(diff[0].numel(), 1)) * grad_loss.to(diff.dtype).view(-1, 1, 1)
    grads = []
    for needed, (x, other, sign, transpose) in zip(
            needs, [(sa, sb, 1.0, False), (sb, sa, 1.0, True), (ta, tb, -1.0, False),
                    (tb, ta, -1.0, True)], strict=True):
        if not needed:
            grads.append(x.new_empty(0))
            continue
        weights = grad_gram * (sign / (x.shape[2] * x.shape[3]))
        weights = weights.transpose(1, 2) if transpose else weights
        grads.append(rows_gemm(torch.empty_like(x), weights, other))
    return tuple(grads)

r"""Triton row-wise softmax divergence (the ``"softmax_kl"`` core): forward KL, reverse KL or
the generalised JSD(β) of (N, L) logits softened by T, in the recomputing form
(docs/design.md, "Row-wise softmax-KL"; the derivation and the RowStats layout are atop
csrc/cpu/softmax_kl.cpp). Grid (N,), one program per row, loops over column blocks.

``_softmax_kl_stats_kernel`` (the forward), two sweeps:

1. online logsumexp of both rows at once: per block m' = max(m, max x), the running sum
   rescaled by exp(m − m'), plus Σ exp(x − m');
2. log q = (s/T − m_s) − log S_s (and log p likewise) and the divergence sums (forward and
   reverse: D; JSD: K_p, K_q).

It writes the per-row loss T²·D and the six RowStats (m_s, log S_s, m_t, log S_t, the two
sums), nothing of row size.

``_softmax_kl_backward_kernel``, one sweep from the inputs and the RowStats: with
G = T · grad_output[r],

    forward  dL/ds = G (q − p),                     dL/dt = G p (log p − log q − D)
    reverse  dL/ds = G q (log q − log p − D),       dL/dt = G (p − q)
    jsd      dL/ds = G (1−β) q (log q − log m − K_q), dL/dt = G β p (log p − log m − K_p)

written once, rounded to the inputs' dtype: forward + backward hold one gradient-sized tensor.

Entries −inf in both rows contribute 0 with a zero gradient; NaN and +inf give NaN. Rows are
read through their row stride (columns must be contiguous: the launchers copy otherwise).
Loss and RowStats are in the accumulation dtype (float32 for float16/bfloat16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast._precision import accumulation_dtype
from kdfast.ops.softmax_kl import ROW_STATS
from kdfast.triton._common import configs

# DIVERGENCE constexpr values.
_FORWARD, _REVERSE, _JSD = 0, 1, 2

_TUNED = [{"BLOCK": b, "num_warps": w} for b, w in [(1024, 4), (2048, 8), (4096, 8)]]
_CONFIGS = configs({"BLOCK": 16}, _TUNED)


@triton.jit
def _fold_block(x, running_max, running_sum):
    """Online logsumexp: (max, Σ exp(· − max)) after the block x (−inf entries add 0)."""
    new_max = tl.maximum(running_max, tl.max(x, 0))
    rescale = tl.where(new_max == running_max, 1.0, tl.exp(running_max - new_max))
    terms = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_max))
    return new_max, running_sum * rescale + tl.sum(terms, 0)


@triton.jit
def _masked_kl_terms(x, log_x, log_y):
    """x (log x − log y), 0 where log x = −inf."""
    return tl.where(log_x == float("-inf"), 0.0, x * (log_x - log_y))


@triton.jit
def _first_argument_grad(x, log_x, log_y, kl):
    """d KL(x‖y) / d logits of x = softmax: x (log x − log y − KL), 0 where x is masked."""
    return tl.where(log_x == float("-inf"), 0.0, x * (log_x - log_y - kl))


@triton.jit
def _block_logits(s_row, t_row, start, arange, L, temperature):
    """Columns ``start + arange`` of both rows over T in the accumulation dtype (−inf past
    the row's end), the columns and their mask."""
    cols = start + arange
    mask = cols < L
    a = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(temperature.dtype) / temperature
    b = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(temperature.dtype) / temperature
    return cols, mask, a, b


@triton.jit
def _block_log_probabilities(s_row, t_row, start, arange, L, temperature, max_s, log_sum_s,
                             max_t, log_sum_t, log_beta, log_rest, DIVERGENCE: tl.constexpr):
    """One block's columns, mask and log q, log p (and log m for the JSD)."""
    cols, mask, a, b = _block_logits(s_row, t_row, start, arange, L, temperature)
    log_q = (a - max_s) - log_sum_s
    log_p = (b - max_t) - log_sum_t
    log_m = log_p
    if DIVERGENCE == 2:
        # log(β p + (1−β) q) in log space; −inf where both are masked.
        x = log_p + log_beta
        y = log_q + log_rest
        hi = tl.maximum(x, y)
        lo = tl.minimum(x, y)
        safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
        log_m = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - safe_hi)))
    return cols, mask, log_q, log_p, log_m


@triton.jit
def _row_and_parameters(s_ptr, t_ptr, params_ptr, s_stride, t_stride):
    """The program's row of both inputs and the four parameters (T, β, log β, log(1−β))."""
    row = tl.program_id(0).to(tl.int64)
    return (row, s_ptr + row * s_stride, t_ptr + row * t_stride, tl.load(params_ptr),
            tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3))


@triton.autotune(configs=_CONFIGS, key=["L", "DIVERGENCE"])
@triton.jit
def _softmax_kl_stats_kernel(s_ptr, t_ptr, loss_ptr, stats_ptr, params_ptr, L, s_stride,
                             t_stride, DIVERGENCE: tl.constexpr, BLOCK: tl.constexpr):
    row, s_row, t_row, temperature, beta, log_beta, log_rest = _row_and_parameters(
        s_ptr, t_ptr, params_ptr, s_stride, t_stride)
    acc = temperature.dtype
    arange = tl.arange(0, BLOCK)

    # Sweep 1: both logsumexps.
    max_s = tl.full([], float("-inf"), acc)
    max_t = tl.full([], float("-inf"), acc)
    sum_s = tl.zeros([], acc)
    sum_t = tl.zeros([], acc)
    for start in range(0, L, BLOCK):
        _, _, a, b = _block_logits(s_row, t_row, start, arange, L, temperature)
        max_s, sum_s = _fold_block(a, max_s, sum_s)
        max_t, sum_t = _fold_block(b, max_t, sum_t)
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)

    # Sweep 2: the divergence sums (forward/reverse: D in first; JSD: K_p, K_q).
    first = tl.zeros([BLOCK], acc)
    second = tl.zeros([BLOCK], acc)
    for start in range(0, L, BLOCK):
        _, mask, log_q, log_p, log_m = _block_log_probabilities(
            s_row, t_row, start, arange, L, temperature, max_s, log_sum_s, max_t, log_sum_t,
            log_beta, log_rest, DIVERGENCE)
        if DIVERGENCE == 0:
            first += tl.where(mask, _masked_kl_terms(tl.exp(log_p), log_p, log_q), 0.0)
        elif DIVERGENCE == 1:
            first += tl.where(mask, _masked_kl_terms(tl.exp(log_q), log_q, log_p), 0.0)
        else:
            first += tl.where(mask, _masked_kl_terms(tl.exp(log_p), log_p, log_m), 0.0)
            second += tl.where(mask, _masked_kl_terms(tl.exp(log_q), log_q, log_m), 0.0)
    kl_first = tl.sum(first, 0)
    kl_second = tl.sum(second, 0)

    stats = stats_ptr + row * 6
    tl.store(stats, max_s)
    tl.store(stats + 1, log_sum_s)
    tl.store(stats + 2, max_t)
    tl.store(stats + 3, log_sum_t)
    tl.store(stats + 4, kl_first)
    tl.store(stats + 5, kl_second)
    divergence = beta * kl_first + (1.0 - beta) * kl_second if DIVERGENCE == 2 else kl_first
    tl.store(loss_ptr + row, temperature * temperature * divergence)


@triton.autotune(configs=_CONFIGS, key=["L", "DIVERGENCE", "GRAD_S", "GRAD_T"])
@triton.jit
def _softmax_kl_backward_kernel(grad_ptr, s_ptr, t_ptr, stats_ptr, gs_ptr, gt_ptr, params_ptr,
                                L, s_stride, t_stride, DIVERGENCE: tl.constexpr,
                                GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                                BLOCK: tl.constexpr):
    row, s_row, t_row, temperature, beta, log_beta, log_rest = _row_and_parameters(
        s_ptr, t_ptr, params_ptr, s_stride, t_stride)
    g_offset = row * L
    stats = stats_ptr + row * 6
    max_s = tl.load(stats)
    log_sum_s = tl.load(stats + 1)
    max_t = tl.load(stats + 2)
    log_sum_t = tl.load(stats + 3)
    kl_first = tl.load(stats + 4)
    kl_second = tl.load(stats + 5)
    scale = temperature * tl.load(grad_ptr + row)  # G = T · grad_output[r]
    arange = tl.arange(0, BLOCK)
    for start in range(0, L, BLOCK):
        cols, mask, log_q, log_p, log_m = _block_log_probabilities(
            s_row, t_row, start, arange, L, temperature, max_s, log_sum_s, max_t, log_sum_t,
            log_beta, log_rest, DIVERGENCE)
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if DIVERGENCE == 0:
            grad_s = q - p
            grad_t = _first_argument_grad(p, log_p, log_q, kl_first)
        elif DIVERGENCE == 1:
            grad_s = _first_argument_grad(q, log_q, log_p, kl_first)
            grad_t = p - q
        else:
            grad_s = (1.0 - beta) * _first_argument_grad(q, log_q, log_m, kl_second)
            grad_t = beta * _first_argument_grad(p, log_p, log_m, kl_first)
        # The stores round once from the accumulation dtype to the gradients' (the inputs').
        if GRAD_S:
            tl.store(gs_ptr + g_offset + cols, scale * grad_s, mask=mask)
        if GRAD_T:
            tl.store(gt_ptr + g_offset + cols, scale * grad_t, mask=mask)


def _divergence_kind(divergence: str, beta: float) -> int:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return _FORWARD
    if divergence == "reverse" or (divergence == "jsd" and beta == 1.0):
        return _REVERSE
    if divergence != "jsd":
        raise ValueError(f"divergence must be forward, reverse or jsd, got {divergence!r}")
    return _JSD


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _params(kind: int, temperature: float, beta: float, like: torch.Tensor) -> torch.Tensor:
    """(T, β, log β, log(1 − β)) in the accumulation dtype on ``like``'s device."""
    logs = (math.log(beta), math.log1p(-beta)) if kind == _JSD else (0.0, 0.0)
    return torch.tensor([temperature, beta, *logs], dtype=accumulation_dtype(like),
                        device=like.device)


def softmax_kl_with_stats(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          divergence: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), row_stats (N, 6)) in the accumulation dtype (zeros for L = 0)."""
    kind = _divergence_kind(divergence, beta)
    s, t = _unit_column_stride(student), _unit_column_stride(teacher)
    rows, cols = s.shape
    acc = accumulation_dtype(s)
    loss = torch.zeros(rows, dtype=acc, device=s.device)
    stats = torch.zeros((rows, ROW_STATS), dtype=acc, device=s.device)
    if rows == 0 or cols == 0:
        return loss, stats
    _softmax_kl_stats_kernel[(rows,)](s, t, loss, stats, _params(kind, temperature, beta, s),
                                      cols, s.stride(0), t.stride(0), DIVERGENCE=kind)
    return loss, stats


def softmax_kl_backward(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                        row_stats: torch.Tensor, temperature: float, divergence: str,
                        beta: float, grad_student: bool, grad_teacher: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d student, d teacher) (N, L), scaled per row by ``grad`` (N,), contiguous, in the
    inputs' dtype; a gradient not asked for is 0 x 0."""
    kind = _divergence_kind(divergence, beta)
    s, t = _unit_column_stride(student), _unit_column_stride(teacher)
    rows, cols = s.shape
    acc = accumulation_dtype(s)
    grad_s = s.new_empty((rows, cols) if grad_student else (0, 0))
    grad_t = t.new_empty((rows, cols) if grad_teacher else (0, 0))
    if rows == 0 or cols == 0 or not (grad_student or grad_teacher):
        return grad_s, grad_t
    _softmax_kl_backward_kernel[(rows,)](
        grad.to(acc).contiguous(), s, t, row_stats.to(acc).contiguous(), grad_s, grad_t,
        _params(kind, temperature, beta, s), cols, s.stride(0), t.stride(0), DIVERGENCE=kind,
        GRAD_S=grad_student, GRAD_T=grad_teacher)
    return grad_s, grad_t

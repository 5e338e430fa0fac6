r"""Triton row-wise softmax divergence (the ``"softmax_kl"`` core): forward KL, reverse KL or
the generalised JSD(β) of (N, L) logits softened by T, the per-row loss T²·D and its
gradients in one kernel (docs/design.md, "Row-wise softmax-KL"; the derivation is atop
csrc/cpu/softmax_kl.cpp).

``_softmax_kl_kernel``, grid (N,), one program per row, loops over column blocks:

1. online logsumexp of both rows at once: per block m' = max(m, max x), the running sum
   rescaled by exp(m − m'), plus Σ exp(x − m');
2. log q = (s/T − m_s) − log S_s (and log p likewise), the divergence sums, and the gradients
   that need no row sum (forward dL/ds = T (q − p), reverse dL/dt = T (p − q));
3. only when asked for a gradient that needs the row's divergence (forward dL/dt, reverse
   dL/ds, both of the JSD): those, x (log x − log y − KL) scaled.

Entries −inf in both rows contribute 0 with a zero gradient; NaN and +inf give NaN. Rows are
read through their row stride (columns must be contiguous: the launcher copies otherwise).
Loss and gradients are in the accumulation dtype (float32 for float16/bfloat16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdfast._precision import accumulation_dtype
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
def _block_log_probabilities(s_row, t_row, cols, mask, temperature, max_s, log_sum_s, max_t,
                             log_sum_t, log_beta, log_rest, DIVERGENCE: tl.constexpr):
    a = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(max_s.dtype) / temperature
    b = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(max_s.dtype) / temperature
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
    return log_q, log_p, log_m


@triton.autotune(configs=_CONFIGS, key=["L", "DIVERGENCE", "GRAD_S", "GRAD_T", "THIRD_SWEEP"])
@triton.jit
def _softmax_kl_kernel(s_ptr, t_ptr, loss_ptr, gs_ptr, gt_ptr, params_ptr, L, s_stride,
                       t_stride, DIVERGENCE: tl.constexpr, GRAD_S: tl.constexpr,
                       GRAD_T: tl.constexpr, THIRD_SWEEP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_offset = row * L
    temperature = tl.load(params_ptr)
    beta = tl.load(params_ptr + 1)
    log_beta = tl.load(params_ptr + 2)
    log_rest = tl.load(params_ptr + 3)
    acc = temperature.dtype
    arange = tl.arange(0, BLOCK)

    # Sweep 1: both logsumexps.
    max_s = tl.full([], float("-inf"), acc)
    max_t = tl.full([], float("-inf"), acc)
    sum_s = tl.zeros([], acc)
    sum_t = tl.zeros([], acc)
    for start in range(0, L, BLOCK):
        cols = start + arange
        mask = cols < L
        a = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(acc) / temperature
        b = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(acc) / temperature
        max_s, sum_s = _fold_block(a, max_s, sum_s)
        max_t, sum_t = _fold_block(b, max_t, sum_t)
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)

    # Sweep 2: divergence sums (forward/reverse: D in first; JSD: K_p, K_q) and the
    # gradients that need no row sum.
    first = tl.zeros([BLOCK], acc)
    second = tl.zeros([BLOCK], acc)
    for start in range(0, L, BLOCK):
        cols = start + arange
        mask = cols < L
        log_q, log_p, log_m = _block_log_probabilities(
            s_row, t_row, cols, mask, temperature, max_s, log_sum_s, max_t, log_sum_t,
            log_beta, log_rest, DIVERGENCE)
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if DIVERGENCE == 0:
            first += tl.where(mask, _masked_kl_terms(p, log_p, log_q), 0.0)
            if GRAD_S:
                tl.store(gs_ptr + g_offset + cols, temperature * (q - p), mask=mask)
        elif DIVERGENCE == 1:
            first += tl.where(mask, _masked_kl_terms(q, log_q, log_p), 0.0)
            if GRAD_T:
                tl.store(gt_ptr + g_offset + cols, temperature * (p - q), mask=mask)
        else:
            first += tl.where(mask, _masked_kl_terms(p, log_p, log_m), 0.0)
            second += tl.where(mask, _masked_kl_terms(q, log_q, log_m), 0.0)
    kl_first = tl.sum(first, 0)
    kl_second = tl.sum(second, 0)

    # Sweep 3: the gradients that need the row's divergence.
    if THIRD_SWEEP:
        for start in range(0, L, BLOCK):
            cols = start + arange
            mask = cols < L
            log_q, log_p, log_m = _block_log_probabilities(
                s_row, t_row, cols, mask, temperature, max_s, log_sum_s, max_t, log_sum_t,
                log_beta, log_rest, DIVERGENCE)
            q = tl.exp(log_q)
            p = tl.exp(log_p)
            if DIVERGENCE == 0:
                tl.store(gt_ptr + g_offset + cols,
                         temperature * _first_argument_grad(p, log_p, log_q, kl_first),
                         mask=mask)
            elif DIVERGENCE == 1:
                tl.store(gs_ptr + g_offset + cols,
                         temperature * _first_argument_grad(q, log_q, log_p, kl_first),
                         mask=mask)
            else:
                if GRAD_S:
                    grad = _first_argument_grad(q, log_q, log_m, kl_second)
                    tl.store(gs_ptr + g_offset + cols, temperature * (1.0 - beta) * grad,
                             mask=mask)
                if GRAD_T:
                    grad = _first_argument_grad(p, log_p, log_m, kl_first)
                    tl.store(gt_ptr + g_offset + cols, temperature * beta * grad, mask=mask)

    divergence = beta * kl_first + (1.0 - beta) * kl_second if DIVERGENCE == 2 else kl_first
    tl.store(loss_ptr + row, temperature * temperature * divergence)


def _divergence_kind(divergence: str, beta: float) -> int:
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return _FORWARD
    if divergence == "reverse" or (divergence == "jsd" and beta == 1.0):
        return _REVERSE
    if divergence != "jsd":
        raise ValueError(f"divergence must be forward, reverse or jsd, got {divergence!r}")
    return _JSD


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def softmax_kl_forward(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                       divergence: str, beta: float, grad_student: bool, grad_teacher: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (N,), dL/ds, dL/dt) in the accumulation dtype; a gradient not asked for is 0 x 0."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    kind = _divergence_kind(divergence, beta)
    s, t = _unit_column_stride(student), _unit_column_stride(teacher)
    rows, cols = s.shape
    acc = accumulation_dtype(s)
    loss = torch.empty(rows, dtype=acc, device=s.device)
    grad_s = torch.empty((rows, cols) if grad_student else (0, 0), dtype=acc, device=s.device)
    grad_t = torch.empty((rows, cols) if grad_teacher else (0, 0), dtype=acc, device=s.device)
    if rows == 0:
        return loss, grad_s, grad_t
    if cols == 0:
        return loss.zero_(), grad_s, grad_t
    logs = (math.log(beta), math.log1p(-beta)) if kind == _JSD else (0.0, 0.0)
    params = torch.tensor([temperature, beta, *logs], dtype=acc, device=s.device)
    third_sweep = ((kind == _FORWARD and grad_teacher) or (kind == _REVERSE and grad_student)
                   or (kind == _JSD and (grad_student or grad_teacher)))
    _softmax_kl_kernel[(rows,)](s, t, loss, grad_s, grad_t, params, cols, s.stride(0),
                                t.stride(0), DIVERGENCE=kind, GRAD_S=grad_student,
                                GRAD_T=grad_teacher, THIRD_SWEEP=third_sweep)
    return loss, grad_s, grad_t

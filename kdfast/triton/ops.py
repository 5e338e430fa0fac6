"""The channel-MMD Triton launchers as ``torch.library`` custom operators, and the autograd
Functions that the ``"triton"`` backend registers for core ``"channel_mmd"`` (the other cores'
Triton op layers live in ``kdfast/ops/<core>.py``; this one moves to ``kdfast/ops/mmd.py``
with the MMD split).

Each fused core is two operators in the ``kdfast_triton`` namespace
(:mod:`kdfast.ops._triton_common`), a forward that returns the result and what the backward
needs, and a backward that returns the input gradients. A backward with
``create_graph=True`` differentiates the core's reference instead
(:mod:`kdfast.ops._higher_order`).

This module imports only torch: an operator's body imports its kernel module (and Triton) on
its first call, so registering the backend never imports Triton.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.ops._triton_common import TRITON_NAMESPACE as _NS
from kdfast.ops._triton_common import empty_accumulation as _new
from kdfast.ops._triton_common import grad_or_empty as _grad_or_empty
from kdfast.reference.nst import (
    as_bandwidths,
    channel_mmd,
    check_unbiased_sizes,
    uses_feature_grams,
)


def _kernels(module: str):
    """``kdfast.triton.<module>``, imported (with Triton) on first use."""
    return importlib.import_module(f"kdfast.triton.{module}")


# --- channel MMD -----------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::linear_mmd", mutates_args=())
def _linear_mmd(x: Tensor, y: Tensor, unbiased: bool, teacher_term: bool, need_x: bool,
                need_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # need_x, need_y: unused (the state serves both gradients); kept for _mmd_function
    return _kernels("mmd").linear_mmd_forward(x, y, unbiased, teacher_term)


@_linear_mmd.register_fake
def _(x, y, unbiased, teacher_term, need_x, need_y):
    batch, hw = x.shape[0], x.shape[2] * x.shape[3]
    return _new(x, batch), _new(x, batch, x.shape[1]), _new(x, batch, y.shape[1]), \
        _new(x, batch, 2, hw)


@torch.library.custom_op(f"{_NS}::linear_mmd_backward", mutates_args=())
def _linear_mmd_backward(grad_loss: Tensor, x: Tensor, y: Tensor, sq_x: Tensor, sq_y: Tensor,
                         sums: Tensor, unbiased: bool, teacher_term: bool, need_x: bool,
                         need_y: bool) -> tuple[Tensor, Tensor]:
    return _kernels("mmd").linear_mmd_backward(grad_loss, x, y, sq_x, sq_y, sums, unbiased,
                                               teacher_term, need_x, need_y)


@_linear_mmd_backward.register_fake
def _(grad_loss, x, y, sq_x, sq_y, sums, unbiased, teacher_term, need_x, need_y):
    return _grad_or_empty(x, need_x), _grad_or_empty(y, need_y)


# The MMD backward recomputes its Gram tiles from the raw features when the map has at most
# this many positions (a row tile of the gradient, BLOCK_M × H·W, then fits in registers);
# larger maps keep the normalised Gram blocks from the forward. Chosen by counting, not yet by
# measurement (no GPU so far): with C = 512 + 2048 at 7×7 the kept blocks are B·1.3M floats
# (335 MB at B = 64), and the weights computed from them several times that, while the
# recompute costs about 2·(C_s + C_t)·C_s·HW extra flops per sample (8 GFLOP at B = 64).
# KDFAST_TRITON_MMD_RECOMPUTE_MAX_HW overrides it (0: always keep the blocks), which is how
# scripts/gpu_check.sh times both paths.
MMD_RECOMPUTE_MAX_HW = int(os.environ.get("KDFAST_TRITON_MMD_RECOMPUTE_MAX_HW", "128"))


def recomputes_grams(features: Tensor) -> bool:
    """Whether the Triton MMD backward recomputes the Gram tiles for these (B, C, H, W)."""
    return features.shape[2] * features.shape[3] <= MMD_RECOMPUTE_MAX_HW


def kept_gram_blocks(x: Tensor, need_x: bool, need_y: bool, teacher_term: bool) -> set[str]:
    """The normalised Gram blocks the MMD forward keeps for the backward: dX needs ss and st,
    dY st and tt (B·C² each); none where the backward recomputes them."""
    if recomputes_grams(x):
        return set()
    return {name for name, needed in [("ss", need_x), ("st", need_x or need_y),
                                      ("tt", need_y and teacher_term)] if needed}


@torch.library.custom_op(f"{_NS}::channel_mmd", mutates_args=())
def _channel_mmd(x: Tensor, y: Tensor, kernel: str, degree: int, coef: float,
                 bandwidths: list[float], sigma_mean: bool, unbiased: bool, teacher_term: bool,
                 need_x: bool, need_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor]:
    sigma2 = "mean" if sigma_mean else tuple(bandwidths)
    return _kernels("mmd").channel_mmd_forward(x, y, kernel, degree, coef, sigma2, unbiased,
                                               teacher_term, need_x, need_y)


@_channel_mmd.register_fake
def _(x, y, kernel, degree, coef, bandwidths, sigma_mean, unbiased, teacher_term, need_x,
      need_y):
    batch, m, n = x.shape[0], x.shape[1], y.shape[1]
    num_sigma = len(bandwidths) if kernel == "rbf" and not sigma_mean else 1
    kept = kept_gram_blocks(x, need_x, need_y, teacher_term)

    def block(name: str, rows: int, cols: int) -> Tensor:
        return _new(x, batch, rows, cols) if name in kept else _new(x, batch, 0, 0)
    return (_new(x, batch), _new(x, batch, m), _new(x, batch, n), _new(x, batch, num_sigma),
            block("ss", m, m), block("st", m, n), block("tt", n, n))


@torch.library.custom_op(f"{_NS}::channel_mmd_backward", mutates_args=())
def _channel_mmd_backward(grad_loss: Tensor, x: Tensor, y: Tensor, sq_x: Tensor, sq_y: Tensor,
                          sigmas: Tensor, g_ss: Tensor, g_st: Tensor, g_tt: Tensor, kernel: str,
                          degree: int, coef: float, unbiased: bool, teacher_term: bool,
                          need_x: bool, need_y: bool) -> tuple[Tensor, Tensor]:
    return _kernels("mmd").channel_mmd_backward(grad_loss, x, y, sq_x, sq_y, sigmas, g_ss, g_st,
                                                g_tt, kernel, degree, coef, unbiased,
                                                teacher_term, need_x, need_y)


@_channel_mmd_backward.register_fake
def _(grad_loss, x, y, sq_x, sq_y, sigmas, g_ss, g_st, g_tt, kernel, degree, coef, unbiased,
      teacher_term, need_x, need_y):
    return _grad_or_empty(x, need_x), _grad_or_empty(y, need_y)


def _mmd_function(name: str, forward_op, backward_op, backward_options,
                  reference_options) -> type:
    """An autograd Function over (x, y, *options) from a core's two operators:
    ``forward_op(x, y, *options, need_x, need_y) -> (loss, *state)`` and
    ``backward_op(grad, x, y, *state, *backward_options(*options), need_x, need_y)``;
    a differentiable backward runs ``channel_mmd(x, y, **reference_options(*options))``."""

    class MMD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, *options):
            need_x, need_y = ctx.needs_input_grad[:2]
            loss, *state = forward_op(x, y, *options, need_x, need_y)
            ctx.options = options
            ctx.save_for_backward(x, y, *state)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            need_x, need_y = ctx.needs_input_grad[:2]
            x, y, *state = ctx.saved_tensors
            unused = [None] * (len(ctx.needs_input_grad) - 2)
            if creates_graph():
                reference = reference_options(*ctx.options)
                return *reference_grads(lambda s, t: channel_mmd(s, t, **reference), (x, y),
                                        (need_x, need_y), grad_loss), *unused
            dx, dy = backward_op(grad_loss, x, y, *state, *backward_options(*ctx.options),
                                 need_x, need_y)
            return (dx if need_x else None), (dy if need_y else None), *unused

    MMD.__name__ = MMD.__qualname__ = name
    return MMD


TritonLinearMMD = _mmd_function(
    "TritonLinearMMD", _linear_mmd, _linear_mmd_backward,
    lambda unbiased, teacher_term: (unbiased, teacher_term),
    lambda unbiased, teacher_term: dict(kernel="linear", unbiased=unbiased,
                                        teacher_term=teacher_term))
TritonChannelMMD = _mmd_function(
    "TritonChannelMMD", _channel_mmd, _channel_mmd_backward,
    lambda kernel, degree, coef, bandwidths, sigma_mean, unbiased, teacher_term: (
        kernel, degree, coef, unbiased, teacher_term),
    lambda kernel, degree, coef, bandwidths, sigma_mean, unbiased, teacher_term: dict(
        kernel=kernel, degree=degree, coef=coef,
        sigma2="mean" if sigma_mean else tuple(bandwidths), unbiased=unbiased,
        teacher_term=teacher_term))


def triton_channel_mmd(student: Tensor, teacher: Tensor, *, kernel: str = "poly",
                       degree: int = 2, coef: float = 0.0, sigma2=(1.0,),
                       unbiased: bool = False, teacher_term: bool = True) -> Tensor:
    """Core ``"channel_mmd"`` on Triton: per-sample MMD² (B,), same options as the reference
    :func:`kdfast.reference.nst.channel_mmd`."""
    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    if uses_feature_grams(student, teacher, kernel, degree, teacher_term):
        # Poly-2 on maps smaller than the channel count: the reference's D × D Grams (two
        # cuBLAS bmm per sample set) need (C_s + C_t)/D times fewer flops than any C × C
        # kernel and keep no B·C² blocks (e.g. 52× at 7×7 with C = 512 + 2048). Chosen by
        # that count; not measured on a GPU yet.
        return channel_mmd(student, teacher, kernel=kernel, degree=degree, coef=coef,
                           unbiased=unbiased, teacher_term=teacher_term)
    if kernel == "linear":
        return TritonLinearMMD.apply(student, teacher, bool(unbiased), bool(teacher_term))
    sigma2 = as_bandwidths(sigma2)
    sigma_mean = sigma2 == "mean"
    bandwidths = [] if sigma_mean else [float(s) for s in sigma2]
    return TritonChannelMMD.apply(student, teacher, kernel, int(degree), float(coef),
                                  bandwidths, sigma_mean, bool(unbiased), bool(teacher_term))

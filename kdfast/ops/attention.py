"""Attention p-norm map: q_hat = normalise_HW(mean_C |A|^p) as an autograd Function.

Backward (docs/design.md): with n = max(||Q||, eps),
    dQ = (dq_hat - <dq_hat, q_hat> q_hat) / n      (the projection only where ||Q|| > eps)
    dA = (p / C) |A|^(p-1) sign(A) dQ
Every backend runs the same two passes, one that reads A (in place through its strides,
channels_last included) and writes q_hat, and one that reads A and writes dA:

* native: ``torch.ops.kdfast.attention_map`` / ``attention_map_backward``
  (csrc/cpu/attention.cpp, csrc/cuda/attention.cu);
* triton: ``torch.ops.kdfast_triton.attention_map`` / ``attention_map_backward``, custom
  operators over the launchers of :mod:`kdfast.triton.attention` (imported on first use).

Both go through one autograd Function shape (:func:`attention_map_function`); a backward with
``create_graph=True`` differentiates the reference instead (:mod:`kdfast.ops._higher_order`).
All implementations are registered at the bottom of this file.

The loss on the two maps (:func:`at_per_sample`): native on the CPU runs it fused,
``torch.ops.kdfast.attention_loss`` / ``attention_loss_backward`` (both maps, the per-sample
loss and, backward, both sides' dA in one call each: :class:`NativeAttentionLoss`); every
other implementation computes the two maps and :func:`~kdfast.reference.attention.
at_loss_from_maps` in torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, needs_autograd, reference_grads
from kdfast.ops._triton_common import TRITON_NAMESPACE
from kdfast.reference.attention import at_loss, at_loss_from_maps, attention_map
from kdfast.triton import supports_without_dot

CORE = "attention_map"


def attention_map_function(name: str, forward: Callable, backward: Callable) -> type:
    """An autograd Function for q_hat = normalise(mean_C |A|^p) from a backend's two kernels:
    ``forward(features, p) -> (q_hat, norm)`` and
    ``backward(grad_map, features, q_hat, norm, p) -> grad_features`` (a differentiable
    backward, ``create_graph=True``, goes through the reference instead)."""
    forward_kernel, backward_kernel = forward, backward  # the methods below shadow the names

    class AttentionMap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, features: torch.Tensor, p: float) -> torch.Tensor:
            q_hat, norm = forward_kernel(features, p)
            ctx.p = p
            ctx.save_for_backward(features, q_hat, norm)
            return q_hat

        @staticmethod
        def backward(ctx, grad_map: torch.Tensor):
            features, q_hat, norm = ctx.saved_tensors
            if not ctx.needs_input_grad[0]:
                return None, None
            if creates_graph():
                (grad,) = reference_grads(lambda f: attention_map(f, ctx.p), (features,),
                                          (True,), grad_map)
                return grad, None
            return backward_kernel(grad_map, features, q_hat, norm, ctx.p), None

    AttentionMap.__name__ = AttentionMap.__qualname__ = name
    return AttentionMap


# --- native ----------------------------------------------------------------------------------

NativeAttentionMap = attention_map_function(
    "NativeAttentionMap", lambda features, p: torch.ops.kdfast.attention_map(features, p),
    lambda *args: torch.ops.kdfast.attention_map_backward(*args))


def native_attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Core ``"attention_map"`` on the native extension: q̂ (B, H·W) for (B, C, H, W)."""
    return NativeAttentionMap.apply(features, float(p))


def _fake_attention_map(features: Tensor, p: float):
    shape = (features.shape[0], features.shape[2] * features.shape[3])
    dtype = accumulation_dtype(features)
    return features.new_empty(shape, dtype=dtype), features.new_empty(shape[:1], dtype=dtype)


def _fake_attention_map_backward(grad_map, features, q_hat, norm, p):
    return torch.empty_like(features)


class NativeAttentionLoss(torch.autograd.Function):
    """Per-sample AT loss (B,) of (student, teacher, p, paper) by the fused CPU operators."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, p: float, paper: bool) -> Tensor:
        loss, *maps = torch.ops.kdfast.attention_loss(student, teacher, p, paper)
        ctx.p, ctx.paper = p, paper
        ctx.save_for_backward(student, teacher, *maps)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, teacher, *maps = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if creates_graph():
            mode = "paper" if ctx.paper else "code"
            return *reference_grads(lambda s, t: at_loss(s, t, ctx.p, mode), (student, teacher),
                                    needs, grad_loss), None, None
        d_student, d_teacher = torch.ops.kdfast.attention_loss_backward(
            grad_loss.contiguous(), student, teacher, *maps, ctx.p, ctx.paper, *needs)
        return d_student if needs[0] else None, d_teacher if needs[1] else None, None, None


def at_per_sample(impl: backends.Implementation, student: Tensor, teacher: Tensor, p: float,
                  mode: str) -> Tensor:
    """The per-sample AT loss (B,) with ``impl``, the chosen implementation of this core:
    fused for native on the CPU (:class:`NativeAttentionLoss`), else its two maps and the
    torch epilogue."""
    if impl.backend == "native" and student.device.type == "cpu":
        options = (float(p), mode == "paper")
        if not needs_autograd(student, teacher):  # no graph: the forward op alone
            return torch.ops.kdfast.attention_loss(student, teacher, *options)[0]
        return NativeAttentionLoss.apply(student, teacher, *options)
    return at_loss_from_maps(impl.fn(student, p), impl.fn(teacher, p), mode)


def _fake_attention_loss(student: Tensor, teacher: Tensor, p: float, paper: bool):
    q_s, norm_s = _fake_attention_map(student, p)
    q_t, norm_t = _fake_attention_map(teacher, p)
    return norm_s.new_empty(norm_s.shape), q_s, norm_s, q_t, norm_t


def _fake_attention_loss_backward(grad, student, teacher, q_s, norm_s, q_t, norm_t, p, paper,
                                  grad_student, grad_teacher):
    return (torch.empty_like(student) if grad_student else student.new_empty(0),
            torch.empty_like(teacher) if grad_teacher else teacher.new_empty(0))


# --- triton ----------------------------------------------------------------------------------

@torch.library.custom_op(f"{TRITON_NAMESPACE}::attention_map", mutates_args=())
def _triton_attention_map(features: Tensor, p: float) -> tuple[Tensor, Tensor]:
    from kdfast.triton import attention as kernels  # imports Triton, on the first call only
    return kernels.attention_forward(features, p)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::attention_map_backward", mutates_args=())
def _triton_attention_map_backward(grad_map: Tensor, features: Tensor, q_hat: Tensor,
                                   norm: Tensor, p: float) -> Tensor:
    from kdfast.triton import attention as kernels
    return kernels.attention_backward(grad_map, features, q_hat, norm, p)


_triton_attention_map.register_fake(_fake_attention_map)
_triton_attention_map_backward.register_fake(_fake_attention_map_backward)

TritonAttentionMap = attention_map_function("TritonAttentionMap", _triton_attention_map,
                                            _triton_attention_map_backward)


def triton_attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Core ``"attention_map"`` on Triton: q̂ (B, H·W) for (B, C, H, W) features."""
    return TritonAttentionMap.apply(features, float(p))


# --- registration ----------------------------------------------------------------------------

backends.register_native_fake("attention_map", _fake_attention_map)
backends.register_native_fake("attention_map_backward", _fake_attention_map_backward)
backends.register_native_fake("attention_loss", _fake_attention_loss)
backends.register_native_fake("attention_loss_backward", _fake_attention_loss_backward)
backends.register(CORE, "reference", attention_map)
backends.register(CORE, "native", native_attention_map, backends.native_supports)
backends.register(CORE, "triton", triton_attention_map, supports_without_dot)

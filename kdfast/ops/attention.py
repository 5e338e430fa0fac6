"""Attention p-norm map: q_hat = normalise_HW(mean_C |A|^p) as an autograd Function.

Backward (docs/design.md): with n = max(||Q||, eps),
    dQ = (dq_hat - <dq_hat, q_hat> q_hat) / n      (the projection only where ||Q|| > eps)
    dA = (p / C) |A|^(p-1) sign(A) dQ
Both directions are native (csrc/cpu/attention.cpp, csrc/cuda/attention.cu): one pass that
reads A (in place through its strides, channels_last included) and writes q_hat, and one
pass that reads A and writes dA. A backward with ``create_graph=True`` differentiates the
reference instead (:mod:`kdfast.ops._higher_order`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.reference.attention import attention_map

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


NativeAttentionMap = attention_map_function(
    "NativeAttentionMap", lambda features, p: torch.ops.kdfast.attention_map(features, p),
    lambda *args: torch.ops.kdfast.attention_map_backward(*args))


def native_attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return NativeAttentionMap.apply(features, float(p))


def _fake_attention_map(features: torch.Tensor, p: float):
    shape = (features.shape[0], features.shape[2] * features.shape[3])
    dtype = accumulation_dtype(features)
    return features.new_empty(shape, dtype=dtype), features.new_empty(shape[:1], dtype=dtype)


def _fake_attention_map_backward(grad_map, features, q_hat, norm, p):
    return torch.empty_like(features)


backends.register_native_fake("attention_map", _fake_attention_map)
backends.register_native_fake("attention_map_backward", _fake_attention_map_backward)
backends.register(CORE, "reference", attention_map)
backends.register(CORE, "native", native_attention_map, backends.native_supports)

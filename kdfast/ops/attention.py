"""Attention p-norm map: q_hat = normalise_HW(mean_C |A|^p) as an autograd Function.

Backward (DESIGN.md §3): with n = max(||Q||, eps),
    dQ = (dq_hat - <dq_hat, q_hat> q_hat) / n      (the projection only where ||Q|| > eps)
    dA = (p / C) |A|^(p-1) sign(A) dQ
"""

from __future__ import annotations

import torch

import kdfast.triton  # noqa: F401  (registers the Triton implementations)
from kdfast import backends
from kdfast.reference.attention import NORM_EPS, attention_map

CORE = "attention_map"


def attention_map_input_grad(grad_map: torch.Tensor, features: torch.Tensor,
                             q_hat: torch.Tensor, norm: torch.Tensor, p: float) -> torch.Tensor:
    """dA from dq_hat: the formula above in PyTorch ops (used until the native backward)."""
    grad_map = grad_map.to(q_hat.dtype)
    clamped = norm.clamp_min(NORM_EPS).unsqueeze(1)
    along = (grad_map * q_hat).sum(dim=1, keepdim=True)
    projected = torch.where((norm > NORM_EPS).unsqueeze(1), grad_map - along * q_hat, grad_map)
    grad_q = (projected / clamped).view(features.shape[0], 1, *features.shape[2:])
    a = features.to(q_hat.dtype)
    local = 2.0 * a if p == 2.0 else p * a.abs().pow(p - 1.0) * a.sign()
    return (local * grad_q / features.shape[1]).to(features.dtype)


class NativeAttentionMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, p: float) -> torch.Tensor:
        q_hat, norm = torch.ops.kdfast.attention_map(features, p)
        ctx.p = p
        ctx.save_for_backward(features, q_hat, norm)
        return q_hat

    @staticmethod
    def backward(ctx, grad_map: torch.Tensor):
        features, q_hat, norm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = attention_map_input_grad(grad_map, features, q_hat, norm, ctx.p)
        return grad, None


def native_attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return NativeAttentionMap.apply(features, float(p))


def _native_supports(features: torch.Tensor, *rest) -> str | None:
    if backends.native_extension() is None:
        return "the native extension is not built"
    if features.device.type != "cpu":
        return f"no native kernel for {features.device.type} tensors yet"
    return None


backends.register(CORE, "reference", attention_map)
backends.register(CORE, "native", native_attention_map, _native_supports)

"""The Triton launchers as ``torch.library`` custom operators, and the autograd Functions
that the ``"triton"`` backend registers.

Each fused core is two operators in the ``kdfast_triton`` namespace, a forward that returns
the result and what the backward needs, and a backward that returns the input gradients
(an empty tensor for an input that needs none). Dynamo and AOTAutograd treat them as opaque
calls with the shapes given by their fake implementations, so a Triton core traces into a
``torch.compile`` graph (``fullgraph=True`` included) like the native operators do, and the
kernels run unchanged inside the compiled code. A backward with ``create_graph=True``
differentiates the core's reference instead (:mod:`kdfast.ops._higher_order`).

This module imports only torch: an operator's body imports its kernel module (and Triton) on
its first call, so registering the backend never imports Triton.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.ops.attention import (
    _fake_attention_map,
    _fake_attention_map_backward,
    attention_map_function,
)
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.sp import similarity_loss

_NS = "kdfast_triton"


def _kernels(module: str):
    """``kdfast.triton.<module>``, imported (with Triton) on first use."""
    return importlib.import_module(f"kdfast.triton.{module}")


def _new(like: Tensor, *shape: int) -> Tensor:
    """An empty tensor of ``shape`` in ``like``'s compute (accumulation) dtype."""
    return like.new_empty(shape, dtype=accumulation_dtype(like))


def _grad_or_empty(x: Tensor, needed: bool) -> Tensor:
    return torch.empty_like(x) if needed else x.new_empty(0)


# --- attention map ---------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::attention_map", mutates_args=())
def _attention_map(features: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return _kernels("attention").attention_forward(features, p)


@torch.library.custom_op(f"{_NS}::attention_map_backward", mutates_args=())
def _attention_map_backward(grad_map: Tensor, features: Tensor, q_hat: Tensor, norm: Tensor,
                            p: float) -> Tensor:
    return _kernels("attention").attention_backward(grad_map, features, q_hat, norm, p)


_attention_map.register_fake(_fake_attention_map)
_attention_map_backward.register_fake(_fake_attention_map_backward)

TritonAttentionMap = attention_map_function("TritonAttentionMap", _attention_map,
                                            _attention_map_backward)


def triton_attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Core ``"attention_map"`` on Triton: q̂ (B, H·W) for (B, C, H, W) features."""
    return TritonAttentionMap.apply(features, float(p))


# --- SP --------------------------------------------------------------------------------------

def dense_rows(x: Tensor) -> Tensor:
    """``x`` if each sample is one dense block of D elements (contiguous or channels_last),
    else a contiguous copy; row b then lives at b * D + k, k < D, in some fixed order."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


@torch.library.custom_op(f"{_NS}::similarity", mutates_args=())
def _similarity(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels("gram").similarity_forward(student, teacher)


@_similarity.register_fake
def _(student, teacher):
    batch = student.shape[0]
    return _new(student, batch), _new(student, 2, batch, batch)


@torch.library.custom_op(f"{_NS}::similarity_backward", mutates_args=())
def _similarity_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, grams: Tensor,
                         need_student: bool, need_teacher: bool) -> tuple[Tensor, Tensor]:
    return _kernels("gram").similarity_backward(grad_loss, student, teacher, grams,
                                                need_student, need_teacher)


@_similarity_backward.register_fake
def _(grad_loss, student, teacher, grams, need_student, need_teacher):
    return _grad_or_empty(student, need_student), _grad_or_empty(teacher, need_teacher)


class TritonSimilarity(torch.autograd.Function):
    """Saves the inputs (a differentiable backward needs their graph) and takes their dense
    rows again in the backward (free unless an input is neither contiguous nor
    channels_last)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor) -> Tensor:
        loss, grams = _similarity(dense_rows(student), dense_rows(teacher))
        ctx.save_for_backward(student, teacher, grams)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, teacher, grams = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad
        if creates_graph():
            return reference_grads(similarity_loss, (student, teacher), (need_s, need_t),
                                   grad_loss)
        ds, dt = _similarity_backward(grad_loss, dense_rows(student), dense_rows(teacher), grams,
                                      need_s, need_t)
        return (ds if need_s else None), (dt if need_t else None)


def triton_similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Core ``"similarity"`` on Triton: per-row SP loss (B,), mean = ‖G_t − G_s‖²_F / B²."""
    return TritonSimilarity.apply(student, teacher)


# --- FSP -------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::fsp", mutates_args=())
def _fsp(student_a: Tensor, student_b: Tensor, teacher_a: Tensor,
         teacher_b: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels("gram").fsp_forward(student_a, student_b, teacher_a, teacher_b)


@_fsp.register_fake
def _(student_a, student_b, teacher_a, teacher_b):
    batch = student_a.shape[0]
    return _new(student_a, batch), _new(student_a, batch, student_a.shape[1], student_b.shape[1])


@torch.library.custom_op(f"{_NS}::fsp_backward", mutates_args=())
def _fsp_backward(grad_loss: Tensor, student_a: Tensor, student_b: Tensor, teacher_a: Tensor,
                  teacher_b: Tensor, diff: Tensor,
                  needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels("gram").fsp_backward(grad_loss, student_a, student_b, teacher_a, teacher_b,
                                         diff, needs)


@_fsp_backward.register_fake
def _(grad_loss, student_a, student_b, teacher_a, teacher_b, diff, needs):
    return tuple(_grad_or_empty(x, needed) for x, needed
                 in zip((student_a, student_b, teacher_a, teacher_b), needs, strict=True))


class TritonFSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_a, student_b, teacher_a, teacher_b):
        loss, diff = _fsp(student_a, student_b, teacher_a, teacher_b)
        ctx.save_for_backward(student_a, student_b, teacher_a, teacher_b, diff)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        needs = list(ctx.needs_input_grad)
        if creates_graph():
            return reference_grads(fsp_pair_loss, ctx.saved_tensors[:4], needs, grad_loss)
        grads = _fsp_backward(grad_loss, *ctx.saved_tensors, needs)
        return tuple(g if needed else None for g, needed in zip(grads, needs, strict=True))


def triton_fsp_pair_loss(student_a: Tensor, student_b: Tensor, teacher_a: Tensor,
                         teacher_b: Tensor) -> Tensor:
    """Core ``"fsp"`` on Triton: per-sample mean over C_a·C_b of (G_s − G_t)², (B,)."""
    return TritonFSP.apply(student_a, student_b, teacher_a, teacher_b)

"""Batch-Gram cores: SP's "similarity" and FSP's "fsp" (docs/design.md, "Batch Gram").

Interfaces (inputs already validated and spatially matched; outputs per sample, (B,)):

* ``"similarity"``: ``fn(student (B, ...), teacher (B, ...))`` -> per-row SP loss whose mean
  is ``||G_t - G_s||_F^2 / B^2``, G = rownormalise(Q Q^T), Q the input flattened to B x D.
  Student and teacher may have different D.
* ``"fsp"``: ``fn(student_a, student_b, teacher_a, teacher_b)`` (each (B, C, H, W); a and b
  of one side share H, W; student C_a == teacher C_a, C_b likewise) -> per-sample mean over
  C_a*C_b of (G_s - G_t)^2, G = X_a X_b^T / HW. The student's H, W may differ from the
  teacher's (each G uses its own HW).

Both may receive non-contiguous or channels_last tensors, any floating dtype, and teachers
with or without ``requires_grad``. ``sp_loss`` calls ``backends.choose(SIMILARITY, backend,
student, teacher)`` and ``fsp_loss`` calls ``backends.choose(FSP, backend, student_a,
student_b, teacher_a, teacher_b)`` once per pair, so a ``supports`` predicate receives those
tensors (and can decline, e.g., student/teacher pairs of different H, W).

* native: the GEMMs run through ATen's BLAS/cuBLAS on raw views of the features
  (channels_last read in place). SP's epilogue is one native kernel (csrc/cpu/gram.cpp,
  csrc/cuda/gram.cu) and its backward the single GEMM dQ = (dA + dA^T) Q; FSP's difference
  is the second GEMM's beta term and its loss one norm reduction (docs/design.md).
* triton: ``torch.ops.kdfast_triton.similarity`` / ``fsp`` and their ``_backward``s, custom
  operators over the launchers of :mod:`kdfast.triton.gram` (imported on first use).

A backward with ``create_graph=True`` differentiates the reference instead
(:mod:`kdfast.ops._higher_order`). All implementations are registered at the bottom of this
file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast import backends
from kdfast._precision import LOW_PRECISION, accumulation_dtype
from kdfast.ops._higher_order import creates_graph, needs_autograd, reference_grads
from kdfast.ops._triton_common import (
    TRITON_NAMESPACE,
    dense_rows,
    empty_accumulation,
    grad_or_empty,
)
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.sp import similarity_loss
from kdfast.triton import supports

SIMILARITY = "similarity"
FSP = "fsp"


# --- native ----------------------------------------------------------------------------------

# fp16/bf16 inputs: products accumulate in fp32 through column chunks of this many fp32
# elements (never a feature-size fp32 copy; a fp16 Q Q^T would overflow at ordinary sizes).
_CHUNK_ELEMENTS = 1 << 20


def _column_chunks(x: torch.Tensor):
    """Slices over x's last dim holding about _CHUNK_ELEMENTS elements each."""
    rows = max(x.numel() // max(x.shape[-1], 1), 1)
    step = max(_CHUNK_ELEMENTS // rows, 1)
    return [slice(k, k + step) for k in range(0, x.shape[-1], step)]


def _products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T over the last dim ((m, K)(n, K) or batched), fp32 for half inputs, else a's dtype."""
    if a.dtype not in LOW_PRECISION:
        return torch.matmul(a, b.transpose(-1, -2))
    out = None
    for cols in _column_chunks(a):
        part = torch.matmul(a[..., cols].float(), b[..., cols].float().transpose(-1, -2))
        out = part if out is None else out.add_(part)
    return out


def _apply_left(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = weight x (weight small, x the raw features), accumulated in fp32 for half x."""
    if x.dtype not in LOW_PRECISION:
        return torch.matmul(weight.to(x.dtype), x, out=out)
    for cols in _column_chunks(x):
        out[..., cols] = torch.matmul(weight, x[..., cols].float())
    return out


def _permuted_flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x as (B, D) without a copy where its memory order allows, and the dim order used.

    A Gram Q Q^T does not depend on the order of the D columns (the same for every row), so
    a channels_last tensor is flattened in its memory order (B, H, W, C).
    """
    order = tuple(range(x.dim()))
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        order = (0, 2, 3, 1)
    return x.permute(order).reshape(x.shape[0], -1), order


def _similarity_input_grad(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dQ = W Q for the (B, D) view Q of the input x, in x's layout."""
    q, order = _permuted_flat(x)
    permuted_shape = [x.shape[d] for d in order]
    grad = _apply_left(weight, q, torch.empty_like(q, memory_format=torch.contiguous_format))
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return grad.view(permuted_shape).permute(inverse)


class NativeSimilarity(torch.autograd.Function):
    """SP per-row loss: Grams on raw views, the epilogue fused natively, and one GEMM
    dQ = (dA + dA^T) Q per side in the backward.

    It saves the inputs, not their (B, D) views: a differentiable backward needs their graph,
    and the views are free to take again (a copy, in the backward only, for an input whose
    memory order is neither contiguous nor channels_last)."""

    @staticmethod
    def loss_and_saved(student: torch.Tensor, teacher: torch.Tensor):
        q_s, q_t = _permuted_flat(student)[0], _permuted_flat(teacher)[0]
        return torch.ops.kdfast.similarity_forward(_products(q_s, q_s), _products(q_t, q_t))

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        loss, *saved = NativeSimilarity.loss_and_saved(student, teacher)
        ctx.save_for_backward(student, teacher, *saved)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher, g_s, g_t, norm_s, norm_t = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad
        if creates_graph():
            return reference_grads(similarity_loss, (student, teacher), (need_s, need_t), grad)
        w_s, w_t = torch.ops.kdfast.similarity_backward(grad, g_s, g_t, norm_s, norm_t,
                                                        need_s, need_t)
        return (_similarity_input_grad(w_s, student) if need_s else None,
                _similarity_input_grad(w_t, teacher) if need_t else None)


def native_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Native "similarity" core: the per-row SP loss, (B,), like ``similarity_loss``."""
    if not needs_autograd(student, teacher):  # no graph: the forward op alone
        return NativeSimilarity.loss_and_saved(student, teacher)[0]
    return NativeSimilarity.apply(student, teacher)


def _hw(x: torch.Tensor) -> int:
    return max(x.shape[2] * x.shape[3], 1)


def _fsp_input_grad(weight: torch.Tensor, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """d x = W X_other (W: B x C_x x C_other), written in x's layout (channels_last kept)."""
    grad = torch.empty_like(x)  # x's strides when x is dense, else contiguous
    h, w = x.shape[2], x.shape[3]
    if h > 1 and w > 1 and grad.stride(2) != w * grad.stride(3):  # H, W do not collapse
        grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    _apply_left(weight, other.flatten(2), grad.view(x.shape[0], x.shape[1], h * w))
    return grad


def _mean_square(diff: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of diff's squares, (B,): one reduction, no B x C_a x C_b temporary.
    Out of place: a Function whose output an in-place op wrote gets a zero gradient under
    torch 2.11's dynamo (the CUDA-build check's compile tests)."""
    elements = max(diff.shape[1] * diff.shape[2], 1)
    return torch.linalg.vector_norm(diff.flatten(1), dim=1).square() / elements


def _fsp_difference(student_a, student_b, teacher_a, teacher_b) -> torch.Tensor:
    """D = G_s - G_t, (B, C_a, C_b) in the accumulation dtype, G = X_a X_b^T / HW per side.

    The subtraction is the student GEMM's own epilogue (``baddbmm_`` with beta = -1/HW_t into
    the teacher's product): one B x C_a x C_b buffer, no pass over the Grams after the GEMMs.
    Half inputs accumulate their products in fp32 chunks and subtract after."""
    scale_s, scale_t = 1.0 / _hw(student_a), 1.0 / _hw(teacher_a)
    diff = _products(teacher_a.flatten(2), teacher_b.flatten(2))
    a, b = student_a.flatten(2), student_b.flatten(2)
    if a.dtype in LOW_PRECISION:
        return diff.mul_(-scale_t).add_(_products(a, b), alpha=scale_s)
    return diff.baddbmm_(a, b.transpose(1, 2), beta=-scale_t, alpha=scale_s)


class NativeFsp(torch.autograd.Function):
    """FSP per-sample loss: batched GEMMs on raw views, the difference fused into the second
    GEMM and the per-sample mean of its squares one norm reduction.

    D is kept as a ctx attribute, not a saved tensor: the first backward scales it in place
    into the GEMM weight (no second B x C_a x C_b buffer) and a second one (``retain_graph``)
    recomputes it, bitwise the same."""

    @staticmethod
    def forward(ctx, student_a, student_b, teacher_a, teacher_b) -> torch.Tensor:
        diff = _fsp_difference(student_a, student_b, teacher_a, teacher_b)
        ctx.save_for_backward(student_a, student_b, teacher_a, teacher_b)
        ctx.difference = diff
        return _mean_square(diff)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = ctx.saved_tensors
        if creates_graph():
            return reference_grads(fsp_pair_loss, inputs, ctx.needs_input_grad, grad)
        diff, ctx.difference = ctx.difference, None
        if diff is None:
            diff = _fsp_difference(*inputs)
        # d loss_b / d G_s = 2 D_b / (C_a C_b); G = X_a X_b^T / HW; the teacher's sign flips.
        coef = grad.to(diff.dtype) * (2.0 / max(diff.shape[1] * diff.shape[2], 1))
        sides = [side for side in (0, 1) if any(ctx.needs_input_grad[2 * side:2 * side + 2])]
        grads = [None] * 4
        for side in sides:
            a, b = inputs[2 * side], inputs[2 * side + 1]
            scale = (coef * ((-1.0 if side else 1.0) / _hw(a))).view(-1, 1, 1)
            weight = diff.mul_(scale) if side == sides[-1] else diff * scale
            if ctx.needs_input_grad[2 * side]:
                grads[2 * side] = _fsp_input_grad(weight, a, b)
            if ctx.needs_input_grad[2 * side + 1]:
                grads[2 * side + 1] = _fsp_input_grad(weight.transpose(1, 2), b, a)
        return tuple(grads)


def native_fsp_pair_loss(student_a: torch.Tensor, student_b: torch.Tensor,
                         teacher_a: torch.Tensor, teacher_b: torch.Tensor) -> torch.Tensor:
    """Native "fsp" core: the per-sample FSP loss of one pair, (B,), like ``fsp_pair_loss``."""
    inputs = (student_a, student_b, teacher_a, teacher_b)
    if not needs_autograd(*inputs):  # no graph: no Function to set up, nothing kept
        return _mean_square(_fsp_difference(*inputs))
    return NativeFsp.apply(*inputs)


def _fake_similarity_forward(gram_s: torch.Tensor, gram_t: torch.Tensor):
    dtype = accumulation_dtype(gram_s)
    rows = gram_s.new_empty(gram_s.shape[:1], dtype=dtype)
    square = gram_s.new_empty(gram_s.shape, dtype=dtype)
    return rows, square, torch.empty_like(square), torch.empty_like(rows), torch.empty_like(rows)


def _fake_similarity_backward(grad, g_s, g_t, norm_s, norm_t, student: bool, teacher: bool):
    n = g_s.shape[0]
    return g_s.new_empty((n if student else 0, n)), g_s.new_empty((n if teacher else 0, n))


# --- triton: similarity ----------------------------------------------------------------------

@torch.library.custom_op(f"{TRITON_NAMESPACE}::similarity", mutates_args=())
def _triton_similarity(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    from kdfast.triton import gram as kernels  # imports Triton, on the first call only
    return kernels.similarity_forward(student, teacher)


@_triton_similarity.register_fake
def _(student, teacher):
    batch = student.shape[0]
    return empty_accumulation(student, batch), empty_accumulation(student, 2, batch, batch)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::similarity_backward", mutates_args=())
def _triton_similarity_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                                grams: Tensor, need_student: bool,
                                need_teacher: bool) -> tuple[Tensor, Tensor]:
    from kdfast.triton import gram as kernels
    return kernels.similarity_backward(grad_loss, student, teacher, grams, need_student,
                                       need_teacher)


@_triton_similarity_backward.register_fake
def _(grad_loss, student, teacher, grams, need_student, need_teacher):
    return grad_or_empty(student, need_student), grad_or_empty(teacher, need_teacher)


class TritonSimilarity(torch.autograd.Function):
    """Saves the inputs (a differentiable backward needs their graph) and takes their dense
    rows again in the backward (free unless an input is neither contiguous nor
    channels_last)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor) -> Tensor:
        loss, grams = _triton_similarity(dense_rows(student), dense_rows(teacher))
        ctx.save_for_backward(student, teacher, grams)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, teacher, grams = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad
        if creates_graph():
            return reference_grads(similarity_loss, (student, teacher), (need_s, need_t),
                                   grad_loss)
        ds, dt = _triton_similarity_backward(grad_loss, dense_rows(student),
                                             dense_rows(teacher), grams, need_s, need_t)
        return (ds if need_s else None), (dt if need_t else None)


def triton_similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Core ``"similarity"`` on Triton: per-row SP loss (B,), mean = ‖G_t − G_s‖²_F / B²."""
    return TritonSimilarity.apply(student, teacher)


# --- triton: FSP -----------------------------------------------------------------------------

@torch.library.custom_op(f"{TRITON_NAMESPACE}::fsp", mutates_args=())
def _triton_fsp(student_a: Tensor, student_b: Tensor, teacher_a: Tensor,
                teacher_b: Tensor) -> tuple[Tensor, Tensor]:
    from kdfast.triton import gram as kernels
    return kernels.fsp_forward(student_a, student_b, teacher_a, teacher_b)


@_triton_fsp.register_fake
def _(student_a, student_b, teacher_a, teacher_b):
    batch = student_a.shape[0]
    return (empty_accumulation(student_a, batch),
            empty_accumulation(student_a, batch, student_a.shape[1], student_b.shape[1]))


@torch.library.custom_op(f"{TRITON_NAMESPACE}::fsp_backward", mutates_args=())
def _triton_fsp_backward(grad_loss: Tensor, student_a: Tensor, student_b: Tensor,
                         teacher_a: Tensor, teacher_b: Tensor, diff: Tensor,
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from kdfast.triton import gram as kernels
    return kernels.fsp_backward(grad_loss, student_a, student_b, teacher_a, teacher_b, diff,
                                needs)


@_triton_fsp_backward.register_fake
def _(grad_loss, student_a, student_b, teacher_a, teacher_b, diff, needs):
    return tuple(grad_or_empty(x, needed) for x, needed
                 in zip((student_a, student_b, teacher_a, teacher_b), needs, strict=True))


class TritonFsp(torch.autograd.Function):
    """FSP per-sample loss: one Triton launch for both Grams, their difference and its mean;
    the backward one ``rows_gemm`` launch per needed input."""

    @staticmethod
    def forward(ctx, student_a, student_b, teacher_a, teacher_b):
        loss, diff = _triton_fsp(student_a, student_b, teacher_a, teacher_b)
        ctx.save_for_backward(student_a, student_b, teacher_a, teacher_b, diff)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        needs = list(ctx.needs_input_grad)
        if creates_graph():
            return reference_grads(fsp_pair_loss, ctx.saved_tensors[:4], needs, grad_loss)
        grads = _triton_fsp_backward(grad_loss, *ctx.saved_tensors, needs)
        return tuple(g if needed else None for g, needed in zip(grads, needs, strict=True))


def triton_fsp_pair_loss(student_a: Tensor, student_b: Tensor, teacher_a: Tensor,
                         teacher_b: Tensor) -> Tensor:
    """Core ``"fsp"`` on Triton: per-sample mean over C_a·C_b of (G_s − G_t)², (B,)."""
    return TritonFsp.apply(student_a, student_b, teacher_a, teacher_b)


# --- registration ----------------------------------------------------------------------------

backends.register_native_fake("similarity_forward", _fake_similarity_forward)
backends.register_native_fake("similarity_backward", _fake_similarity_backward)
backends.register(SIMILARITY, "reference", similarity_loss)
backends.register(SIMILARITY, "native", native_similarity_loss, backends.native_supports)
backends.register(SIMILARITY, "triton", triton_similarity_loss, supports)
backends.register(FSP, "reference", fsp_pair_loss)
backends.register(FSP, "native", native_fsp_pair_loss, backends.native_supports)
backends.register(FSP, "triton", triton_fsp_pair_loss, supports)

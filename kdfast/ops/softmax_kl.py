"""The ``"softmax_kl"`` core: per row of (N, L) logits, T² · divergence(softmax(t/T),
softmax(s/T)), forward KL (KD, DML, BAN), reverse KL or the generalised JSD(β)
(:mod:`kdfast.reference.softmax_kl`; docs/design.md, "Row-wise softmax-KL").

Signature of every implementation:
``fn(student, teacher, temperature, divergence="forward", beta=0.5) -> (N,)``.

Two ways to get the gradients, both fused:

* saved (Triton, native CUDA): the forward computes the loss *and* the gradients (w.r.t. the
  student, and the teacher when it requires grad) in one pass per row and keeps only those
  gradients (in the accumulation dtype: fp32 for fp16/bf16 inputs), so the backward is
  ``grad_output[:, None] * saved_gradient``. Forward + backward hold two gradient-sized
  tensors at the peak (the saved one and the product).
* recomputed (native CPU): the forward (``kdfast::softmax_kl_with_stats``) computes the loss
  and keeps nothing of row size, only six numbers per row (both softmax normalisers and the
  divergence sums); the backward ``kdfast::softmax_kl_backward`` rereads the inputs once and
  writes ``grad_output[r] · dL/ds`` in the inputs' dtype straight into the returned gradient:
  one gradient-sized tensor at the peak (the target of CWD's segmentation maps, B·C rows of
  H·W), and faster than the saved form on the CPU (one read of the inputs more, but no
  accumulation-dtype gradient written and read back).

A backward with ``create_graph=True`` differentiates the reference instead
(:mod:`kdfast.ops._higher_order`). Backends: ``reference``, ``native`` (CPU:
csrc/cpu/softmax_kl.cpp; CUDA: csrc/cuda/softmax_kl.cu) and ``triton``
(kdfast/triton/softmax_kl.py, the custom operator ``kdfast_triton::softmax_kl``).
"""

from __future__ import annotations

import torch

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.ops._triton_common import TRITON_NAMESPACE
from kdfast.reference.softmax_kl import softmax_kl
from kdfast.triton import supports_without_dot

CORE = "softmax_kl"


def softmax_kl_function(name: str, kernel) -> type:
    """An autograd Function over a fused kernel ``kernel(student, teacher, temperature,
    divergence, beta, grad_student, grad_teacher) -> (loss, d_student, d_teacher)`` (the
    gradients of the per-row loss in the accumulation dtype, 0 x 0 where not requested;
    the backward scales them and rounds once to the inputs' dtype)."""

    class SoftmaxKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, teacher, temperature, divergence, beta):
            need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            loss, d_student, d_teacher = kernel(student, teacher, temperature, divergence,
                                                beta, need_s, need_t)
            ctx.options = (temperature, divergence, beta)
            ctx.save_for_backward(student, teacher, d_student, d_teacher)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            student, teacher, d_student, d_teacher = ctx.saved_tensors
            need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            unused = (None, None, None)
            if creates_graph():
                return *reference_grads(lambda s, t: softmax_kl(s, t, *ctx.options),
                                        (student, teacher), (need_s, need_t), grad_loss), *unused
            scale = grad_loss[:, None]
            grad_s = (scale * d_student).to(student.dtype) if need_s else None
            grad_t = (scale * d_teacher).to(teacher.dtype) if need_t else None
            return grad_s, grad_t, *unused

    SoftmaxKL.__name__ = SoftmaxKL.__qualname__ = name
    return SoftmaxKL


SavingNativeSoftmaxKL = softmax_kl_function(
    "SavingNativeSoftmaxKL", lambda *args: torch.ops.kdfast.softmax_kl(*args))


class RecomputingNativeSoftmaxKL(torch.autograd.Function):
    """The CPU form: the forward keeps the inputs and six numbers per row, the backward
    recomputes the gradients scaled by grad_output (``kdfast::softmax_kl_backward``)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, divergence, beta):
        loss, row_stats = torch.ops.kdfast.softmax_kl_with_stats(student, teacher, temperature,
                                                                 divergence, beta)
        ctx.options = (temperature, divergence, beta)
        ctx.save_for_backward(student, teacher, row_stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, row_stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        unused = (None, None, None)
        if creates_graph():
            return *reference_grads(lambda s, t: softmax_kl(s, t, *ctx.options),
                                    (student, teacher), (need_s, need_t), grad_loss), *unused
        grad_s, grad_t = torch.ops.kdfast.softmax_kl_backward(
            grad_loss, student, teacher, row_stats, *ctx.options, need_s, need_t)
        return grad_s if need_s else None, grad_t if need_t else None, *unused


def native_softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Core ``"softmax_kl"`` on the native kernels (csrc/cpu/softmax_kl.cpp, recomputing in
    the backward; CUDA tensors in a CUDA build: csrc/cuda/softmax_kl.cu, saving the
    gradient): (N,)."""
    function = RecomputingNativeSoftmaxKL if student.device.type == "cpu" else \
        SavingNativeSoftmaxKL
    return function.apply(student, teacher, float(temperature), divergence, float(beta))


def fake_softmax_kl(student, teacher, temperature, divergence, beta, grad_student,
                    grad_teacher):
    """Shapes of the fused kernels' outputs (the fake of every backend's operator)."""
    dtype = accumulation_dtype(student)

    def gradient(x, needed):
        return x.new_empty(x.shape if needed else (0, 0), dtype=dtype)

    return (student.new_empty(student.shape[:1], dtype=dtype), gradient(student, grad_student),
            gradient(teacher, grad_teacher))


@torch.library.custom_op(f"{TRITON_NAMESPACE}::softmax_kl", mutates_args=())
def triton_softmax_kl_op(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                         divergence: str, beta: float, grad_student: bool, grad_teacher: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton launcher (:mod:`kdfast.triton.softmax_kl`, imported with Triton on the
    first call, so registering the backend never imports Triton)."""
    from kdfast.triton import softmax_kl as kernels  # imports Triton, on the first call only
    return kernels.softmax_kl_forward(student, teacher, temperature, divergence, beta,
                                      grad_student, grad_teacher)


ROW_STATS = 6  # per row: max and log-sum of both softmaxes, the two divergence sums


def fake_softmax_kl_with_stats(student, teacher, temperature, divergence, beta):
    """Shapes of ``kdfast::softmax_kl_with_stats``: loss (N,), row_stats (N, 6)."""
    dtype = accumulation_dtype(student)
    return (student.new_empty(student.shape[:1], dtype=dtype),
            student.new_empty((student.shape[0], ROW_STATS), dtype=dtype))


def fake_softmax_kl_backward(grad, student, teacher, row_stats, temperature, divergence, beta,
                             grad_student, grad_teacher):
    """Shapes of ``kdfast::softmax_kl_backward``'s gradients (the inputs' dtype)."""
    def gradient(x, needed):
        return x.new_empty(x.shape if needed else (0, 0))

    return gradient(student, grad_student), gradient(teacher, grad_teacher)


triton_softmax_kl_op.register_fake(fake_softmax_kl)

TritonSoftmaxKL = softmax_kl_function("TritonSoftmaxKL", triton_softmax_kl_op)


def triton_softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Core ``"softmax_kl"`` on Triton (kdfast/triton/softmax_kl.py): (N,)."""
    return TritonSoftmaxKL.apply(student, teacher, float(temperature), divergence, float(beta))


backends.register_native_fake("softmax_kl", fake_softmax_kl)
backends.register_native_fake("softmax_kl_with_stats", fake_softmax_kl_with_stats)
backends.register_native_fake("softmax_kl_backward", fake_softmax_kl_backward)
backends.register(CORE, "reference", softmax_kl)
backends.register(CORE, "native", native_softmax_kl, backends.native_supports)
backends.register(CORE, "triton", triton_softmax_kl, supports_without_dot)

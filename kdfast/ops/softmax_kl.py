"""The ``"softmax_kl"`` core: per row of (N, L) logits, T² · divergence(softmax(t/T),
softmax(s/T)), forward KL (KD, DML, BAN), reverse KL or the generalised JSD(β)
(:mod:`kdfast.reference.softmax_kl`; docs/design.md, "Row-wise softmax-KL").

Signature of every implementation:
``fn(student, teacher, temperature, divergence="forward", beta=0.5) -> (N,)``.

The gradients are recomputed on every backend (KD's CPU case below aside): the forward
(``softmax_kl_with_stats``) computes the loss and keeps nothing of row size, only six numbers
per row (both softmax normalisers and the divergence sums); the backward
(``softmax_kl_backward``) rereads the inputs once and writes ``grad_output[r] · dL/ds`` (and
dL/dt when the teacher requires grad) in the inputs' dtype straight into the returned
gradient: forward + backward hold one gradient-sized tensor at the peak (the target of CWD's
segmentation maps, B·C rows of H·W), for one more read of the inputs than a forward that keeps
the gradient.

The native operator ``kdfast::softmax_kl`` (CPU and CUDA) is the other form, the gradient
computed in the forward pass and returned in the accumulation dtype. The chunked fused linear
KD (:mod:`kdfast.ops.fused_linear_kd`) needs it there, chunk by chunk; and KD's case on the CPU
takes it too (:func:`keeps_gradient`: forward KL, the student's gradient only, fp32/fp64 rows of
at most ``KEPT_GRADIENT_MAX_COLUMNS``): the kernel then keeps the exps of its one read of the
rows and the gradient costs a multiply per entry instead of the backward's two exps and second
read — for one gradient-sized tensor held from the forward to the backward (segmentation-map
rows, longer, keep recomputing).

A backward with ``create_graph=True`` differentiates the reference instead
(:mod:`kdfast.ops._higher_order`). Backends: ``reference``, ``native`` (CPU:
csrc/cpu/softmax_kl.cpp; CUDA: csrc/cuda/softmax_kl.cu) and ``triton``
(kdfast/triton/softmax_kl.py, the custom operators ``kdfast_triton::softmax_kl_with_stats``
and ``kdfast_triton::softmax_kl_backward``).
"""

from __future__ import annotations

import torch

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, needs_autograd, reference_grads
from kdfast.ops._triton_common import TRITON_NAMESPACE
from kdfast.reference.softmax_kl import softmax_kl
from kdfast.triton import supports_without_dot

CORE = "softmax_kl"
ROW_STATS = 6  # per row: max and log-sum of both softmaxes, the two divergence sums


KEPT_GRADIENT_MAX_COLUMNS = 65536  # rows up to here keep their gradient on the CPU


def keeps_gradient(student: torch.Tensor, teacher: torch.Tensor, divergence: str) -> bool:
    """Whether the native forward computes the gradient and keeps it for the backward (the
    fused ``kdfast::softmax_kl``) rather than six numbers per row: KD's case on the CPU —
    forward KL, a backward to come for the student only (grad mode on, the teacher frozen),
    the inputs in their accumulation dtype (fp32, fp64) and rows of at most
    ``KEPT_GRADIENT_MAX_COLUMNS`` logits (a vocabulary, not a segmentation map's H·W: those
    keep the recomputing form's memory)."""
    return (student.device.type == "cpu" and divergence == "forward"
            and torch.is_grad_enabled() and student.requires_grad and not teacher.requires_grad
            and accumulation_dtype(student) == student.dtype
            and student.shape[-1] <= KEPT_GRADIENT_MAX_COLUMNS)


def scaled_kept_gradient(ctx, grad_loss: torch.Tensor, rerun, dtype: torch.dtype
                         ) -> torch.Tensor:
    """A forward's kept per-row gradient (``ctx.kept_gradient``, the accumulation dtype) times
    ``grad_loss[r]``: the first backward scales it in place and hands it on; a second one
    (``retain_graph``) gets ``rerun()``, the same kernel again (bitwise the same); inputs of
    a lower ``dtype`` get it scaled in fp32 and rounded once."""
    kept, ctx.kept_gradient = ctx.kept_gradient, None
    if kept is None:
        kept = rerun()
    if kept.dtype != dtype:
        return (kept * grad_loss[:, None]).to(dtype)
    return kept.mul_(grad_loss[:, None])


def softmax_kl_function(name: str, with_stats, backward, fused=None) -> type:
    """An autograd Function over a recomputing pair of operators: ``with_stats(student,
    teacher, temperature, divergence, beta) -> (loss, row_stats)`` and ``backward(grad,
    student, teacher, row_stats, temperature, divergence, beta, grad_student, grad_teacher)
    -> (d student, d teacher)`` (0 x 0 where not requested). ``apply(student, teacher,
    temperature, divergence, beta, keep_gradient)``: with ``keep_gradient`` the forward runs
    ``fused`` (the signature of ``kdfast::softmax_kl``) and keeps the student's gradient
    instead (:func:`keeps_gradient`)."""

    class SoftmaxKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student, teacher, temperature, divergence, beta, keep_gradient):
            ctx.options = (temperature, divergence, beta)
            ctx.kept_gradient = None
            if keep_gradient:
                # Not a saved tensor: the first backward scales it in place and hands it on.
                loss, ctx.kept_gradient, _ = fused(student, teacher, temperature, divergence,
                                                   beta, True, False)
                ctx.save_for_backward(student, teacher)
                return loss
            loss, row_stats = with_stats(student, teacher, temperature, divergence, beta)
            ctx.save_for_backward(student, teacher, row_stats)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            student, teacher, *row_stats = ctx.saved_tensors
            need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            unused = (None, None, None, None)
            if creates_graph():
                return *reference_grads(lambda s, t: softmax_kl(s, t, *ctx.options),
                                        (student, teacher), (need_s, need_t), grad_loss), *unused
            if not row_stats:
                return scaled_kept_gradient(
                    ctx, grad_loss, lambda: fused(student, teacher, *ctx.options, True, False)[1],
                    student.dtype), None, *unused
            grad_s, grad_t = backward(grad_loss, student, teacher, row_stats[0], *ctx.options,
                                      need_s, need_t)
            return grad_s if need_s else None, grad_t if need_t else None, *unused

    SoftmaxKL.__name__ = SoftmaxKL.__qualname__ = name
    return SoftmaxKL


NativeSoftmaxKL = softmax_kl_function(
    "NativeSoftmaxKL", lambda *args: torch.ops.kdfast.softmax_kl_with_stats(*args),
    lambda *args: torch.ops.kdfast.softmax_kl_backward(*args),
    lambda *args: torch.ops.kdfast.softmax_kl(*args))


def native_softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Core ``"softmax_kl"`` on the native kernels (csrc/cpu/softmax_kl.cpp; CUDA tensors in a
    CUDA build: csrc/cuda/softmax_kl.cu): (N,)."""
    if not needs_autograd(student, teacher):  # the op alone: no Function to set up
        return torch.ops.kdfast.softmax_kl_with_stats(student, teacher, float(temperature),
                                                      divergence, float(beta))[0]
    return NativeSoftmaxKL.apply(student, teacher, float(temperature), divergence, float(beta),
                                 keeps_gradient(student, teacher, divergence))


def fake_softmax_kl(student, teacher, temperature, divergence, beta, grad_student,
                    grad_teacher):
    """Shapes of ``kdfast::softmax_kl``'s outputs (the accumulation dtype)."""
    dtype = accumulation_dtype(student)

    def gradient(x, needed):
        return x.new_empty(x.shape if needed else (0, 0), dtype=dtype)

    return (student.new_empty(student.shape[:1], dtype=dtype), gradient(student, grad_student),
            gradient(teacher, grad_teacher))


def fake_softmax_kl_with_stats(student, teacher, temperature, divergence, beta):
    """Shapes of ``softmax_kl_with_stats`` (native and Triton): loss (N,), row_stats (N, 6)."""
    dtype = accumulation_dtype(student)
    return (student.new_empty(student.shape[:1], dtype=dtype),
            student.new_empty((student.shape[0], ROW_STATS), dtype=dtype))


def fake_softmax_kl_backward(grad, student, teacher, row_stats, temperature, divergence, beta,
                             grad_student, grad_teacher):
    """Shapes of ``softmax_kl_backward``'s gradients (native and Triton; the inputs' dtype)."""
    def gradient(x, needed):
        return x.new_empty(x.shape if needed else (0, 0))

    return gradient(student, grad_student), gradient(teacher, grad_teacher)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::softmax_kl_with_stats", mutates_args=())
def triton_softmax_kl_with_stats_op(student: torch.Tensor, teacher: torch.Tensor,
                                    temperature: float, divergence: str, beta: float
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton forward launcher (:mod:`kdfast.triton.softmax_kl`, imported with Triton on
    the first call, so registering the backend never imports Triton)."""
    from kdfast.triton import softmax_kl as kernels  # imports Triton, on the first call only
    return kernels.softmax_kl_with_stats(student, teacher, temperature, divergence, beta)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::softmax_kl_backward", mutates_args=())
def triton_softmax_kl_backward_op(grad: torch.Tensor, student: torch.Tensor,
                                  teacher: torch.Tensor, row_stats: torch.Tensor,
                                  temperature: float, divergence: str, beta: float,
                                  grad_student: bool, grad_teacher: bool
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backward launcher."""
    from kdfast.triton import softmax_kl as kernels
    return kernels.softmax_kl_backward(grad, student, teacher, row_stats, temperature,
                                       divergence, beta, grad_student, grad_teacher)


triton_softmax_kl_with_stats_op.register_fake(fake_softmax_kl_with_stats)
triton_softmax_kl_backward_op.register_fake(fake_softmax_kl_backward)

TritonSoftmaxKL = softmax_kl_function("TritonSoftmaxKL", triton_softmax_kl_with_stats_op,
                                      triton_softmax_kl_backward_op)


def triton_softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Core ``"softmax_kl"`` on Triton (kdfast/triton/softmax_kl.py): (N,)."""
    return TritonSoftmaxKL.apply(student, teacher, float(temperature), divergence, float(beta),
                                 False)


backends.register_native_fake("softmax_kl", fake_softmax_kl)
backends.register_native_fake("softmax_kl_with_stats", fake_softmax_kl_with_stats)
backends.register_native_fake("softmax_kl_backward", fake_softmax_kl_backward)
backends.register(CORE, "reference", softmax_kl)
backends.register(CORE, "native", native_softmax_kl, backends.native_supports)
backends.register(CORE, "triton", triton_softmax_kl, supports_without_dot)

"""DKD on the CPU in one native pass per row: ``kdfast::dkd`` (csrc/cpu/softmax_kl.cpp,
``dkd_row``; the math above it and in :mod:`kdfast.reference.dkd`).

The ``"softmax_kl"`` core's forward-KL sweep over each row with the gold column masked inside
the pass (NCKD), TCKD from that sweep's normalisers and the two gold logits, and the combined
gradient ``T ((β − αΔ) p̂_s − β p̂_t)`` (``T α Δ`` at the gold class, Δ = p_s,g − p_t,g) from the
exps the sweep kept: the forward computes the loss and the student's gradient, the backward
scales that gradient by grad_output (in place for fp32/fp64 inputs: one gradient-sized tensor
at the peak). Where it does not apply (:func:`fused_dkd_applies`: a teacher that needs a
gradient, CUDA tensors, no native build) ``kdfast.functional.dkd_loss`` composes the
``"softmax_kl"`` core on logits with the gold column set to −inf and the reference TCKD.
"""

from __future__ import annotations

import torch

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, needs_autograd, reference_grads
from kdfast.ops.softmax_kl import scaled_kept_gradient
from kdfast.reference.dkd import dkd_loss as reference_dkd


def fused_dkd_applies(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether ``kdfast::dkd`` runs this call (the ``"softmax_kl"`` core's backend chosen as
    native): CPU tensors and a teacher that needs no gradient."""
    return (student.device.type == "cpu" and not teacher.requires_grad
            and hasattr(torch.ops.kdfast, "dkd"))


class NativeDKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, targets, temperature, alpha, beta):
        ctx.options = (temperature, alpha, beta)
        loss, ctx.kept_gradient = torch.ops.kdfast.dkd(student, teacher, targets, temperature,
                                                       alpha, beta, True)
        ctx.save_for_backward(student, teacher, targets)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, targets = ctx.saved_tensors
        unused = (None, None, None, None, None)
        if creates_graph():
            return *reference_grads(lambda s: reference_dkd(s, teacher, targets, *ctx.options),
                                    (student,), (True,), grad_loss), *unused
        return scaled_kept_gradient(
            ctx, grad_loss,
            lambda: torch.ops.kdfast.dkd(student, teacher, targets, *ctx.options, True)[1],
            student.dtype), *unused


def native_dkd(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
               temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """α · TCKD + β · NCKD per sample (B,) in one native pass per row; validated inputs of one
    dtype, :func:`fused_dkd_applies`."""
    if not needs_autograd(student):  # the op alone: no Function to set up
        return torch.ops.kdfast.dkd(student, teacher, targets, float(temperature),
                                    float(alpha), float(beta), False)[0]
    return NativeDKD.apply(student, teacher, targets, float(temperature), float(alpha),
                           float(beta))


def fake_dkd(student, teacher, targets, temperature, alpha, beta, grad_student):
    """Shapes of ``kdfast::dkd``'s outputs (the accumulation dtype)."""
    dtype = accumulation_dtype(student)
    return (student.new_empty(student.shape[:1], dtype=dtype),
            student.new_empty(student.shape if grad_student else (0, 0), dtype=dtype))


backends.register_native_fake("dkd", fake_dkd)

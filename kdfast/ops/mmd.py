"""Channel MMD (NST): per-sample MMD² over channels-as-samples, see docs/design.md.

Core ``"channel_mmd"``: fn(student (B, C_s, H, W), teacher (B, C_t, H, W), *, kernel, degree,
coef, sigma2 (tuple of floats or "mean"), unbiased, teacher_term) -> (B,). The inputs are
validated and spatially matched by :func:`kdfast.functional.nst_loss`.

The ``native`` backend (``torch.ops.kdfast.channel_mmd``, C++ on CPU, CUDA when built) reads
the raw features in place: Grams over the raw channels with the normalisation folded in from
their diagonals, φ and the three block means in one epilogue, and a backward of two GEMMs per
input, dX = g·(M_ss X + M_st Y), from small (C × C) matrices the forward leaves behind. A
backward with ``create_graph=True`` differentiates the reference instead
(:mod:`kdfast.ops._higher_order`).
"""

from __future__ import annotations

import torch

from kdfast import backends
from kdfast._precision import accumulation_dtype
from kdfast.ops._higher_order import creates_graph, reference_grads
from kdfast.reference.nst import channel_mmd, uses_feature_grams

CORE = "channel_mmd"

# The native kernels take at most this many rbf bandwidths (kMmdMaxBandwidths in math.h).
MAX_BANDWIDTHS = 16


class NativeChannelMMD(torch.autograd.Function):
    """Autograd wrapper of ``torch.ops.kdfast.channel_mmd`` and its backward."""

    @staticmethod
    def forward(ctx, student, teacher, kernel, degree, coef, sigma2, unbiased, teacher_term):
        sigma_mean = sigma2 == "mean"
        bandwidths = [] if sigma_mean else [float(s) for s in sigma2]
        grad_student, grad_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, *state = torch.ops.kdfast.channel_mmd(
            student, teacher, kernel, int(degree), float(coef), bandwidths, sigma_mean,
            bool(unbiased), bool(teacher_term), grad_student, grad_teacher)
        ctx.options = dict(kernel=kernel, degree=int(degree), coef=float(coef), sigma2=sigma2,
                           unbiased=bool(unbiased), teacher_term=bool(teacher_term))
        ctx.save_for_backward(student, teacher, *state)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, *state = ctx.saved_tensors
        grad_student, grad_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        unused = (None,) * 6
        if creates_graph():
            return *reference_grads(lambda s, t: channel_mmd(s, t, **ctx.options),
                                    (student, teacher), (grad_student, grad_teacher),
                                    grad_loss), *unused
        options = ctx.options
        d_student, d_teacher = torch.ops.kdfast.channel_mmd_backward(
            grad_loss.contiguous(), student, teacher, *state, options["kernel"], options["coef"],
            options["unbiased"], options["teacher_term"], grad_student, grad_teacher)
        return (d_student if grad_student else None, d_teacher if grad_teacher else None,
                *unused)


def native_channel_mmd(student: torch.Tensor, teacher: torch.Tensor, *, kernel: str = "poly",
                       degree: int = 2, coef: float = 0.0, sigma2=(1.0,), unbiased: bool = False,
                       teacher_term: bool = True) -> torch.Tensor:
    """:func:`kdfast.reference.nst.channel_mmd` computed by the native kernels; (B,)."""
    if backends.native_extension() is None:
        raise RuntimeError("kdfast's native extension is not built; use the reference backend")
    if not isinstance(sigma2, str):
        sigma2 = (float(sigma2),) if isinstance(sigma2, (int, float)) else tuple(sigma2)
    return NativeChannelMMD.apply(student, teacher, kernel, degree, coef, sigma2, unbiased,
                                  teacher_term)


def native_channel_mmd_checked(student, teacher, *, kernel: str = "poly", degree: int = 2,
                               sigma2=(1.0,), teacher_term: bool = True, **options):
    """The registered native fn: more bandwidths than the kernels take go to the reference,
    and so does CUDA poly-2 on maps smaller than the channel count (its D × D Grams, as the
    Triton backend does; the CPU kernels have a D × D path of their own)."""
    options.update(kernel=kernel, degree=degree, sigma2=sigma2, teacher_term=teacher_term)
    too_many = not isinstance(sigma2, (str, int, float)) and len(sigma2) > MAX_BANDWIDTHS
    feature_grams = student.device.type == "cuda" and uses_feature_grams(
        student, teacher, kernel, degree, teacher_term)
    if too_many or feature_grams:
        return channel_mmd(student, teacher, **options)
    return native_channel_mmd(student, teacher, **options)


def _fake_channel_mmd(student, teacher, kernel, degree, coef, sigma2, sigma_mean, unbiased,
                      teacher_term, grad_student, grad_teacher):
    """Shapes of torch.ops.kdfast.channel_mmd's outputs (for torch.compile tracing)."""
    batch, m, n = student.shape[0], student.shape[1], teacher.shape[1]
    hw = student.shape[2] * student.shape[3]
    dtype = accumulation_dtype(student)

    def new(*shape):
        return student.new_empty(shape, dtype=dtype)
    if kernel == "linear":
        return new(batch), new(batch, hw), new(batch, hw), new(batch, m), new(batch, n)
    if (student.device.type == "cpu" and kernel == "poly" and degree == 2
            and hw < m + (n if teacher_term else 0)):  # the D x D path of csrc/cpu/mmd.cpp
        return new(batch), new(batch, 2, hw, hw), new(batch, 2, hw), new(batch, m), new(batch, n)
    return (new(batch), new(batch, m, m) if grad_student else new(0), new(batch, m, n),
            new(batch, n, n) if grad_teacher else new(0), new(batch))  # + per-sample row scale


def _fake_channel_mmd_backward(grad, student, teacher, s0, s1, s2, s3, kernel, coef, unbiased,
                               teacher_term, grad_student, grad_teacher):
    return (student.new_empty(student.shape) if grad_student else student.new_empty(0),
            teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty(0))


backends.register_native_fake("channel_mmd", _fake_channel_mmd)
backends.register_native_fake("channel_mmd_backward", _fake_channel_mmd_backward)
backends.register(CORE, "reference", channel_mmd)
backends.register(CORE, "native", native_channel_mmd_checked, backends.native_supports)

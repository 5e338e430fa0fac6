"""Channel MMD (NST): per-sample MMD² over channels-as-samples, see docs/design.md.

Core ``"channel_mmd"``: fn(student (B, C_s, H, W), teacher (B, C_t, H, W), *, kernel, degree,
coef, sigma2 (tuple of floats or "mean"), unbiased, teacher_term) -> (B,). The inputs are
validated and spatially matched by :func:`kdfast.functional.nst_loss`.

Three algorithms (docs/design.md, "Channel MMD", *Three algorithms, chosen by shape*), picked
by one rule, :func:`channel_mmd_path`, for every backend and for the reference:

* ``GRAM``, C × C Grams of the channels (poly, rbf): native ``kdfast::channel_mmd_gram`` →
  (loss, m_ss, m_st, m_tt, row_scale); Triton ``kdfast_triton::channel_mmd_gram`` → (loss,
  sq_x, sq_y, sigmas, g_ss, g_st, g_tt).
* ``FEATURE_GRAM``, D × D Grams of the positions (poly d = 2 on maps smaller than 5/8 of
  the Gram rows): native ``kdfast::channel_mmd_feature_gram`` on CPU → (loss, feature_weights,
  feature_offsets, inv_norm_x, inv_norm_y); on CUDA and Triton
  :func:`feature_gram_channel_mmd` (torch matmuls).
* ``LINEAR``, no Gram (linear kernel): native ``kdfast::channel_mmd_linear`` → (loss, sum_x,
  sum_y, inv_norm_x, inv_norm_y); Triton ``kdfast_triton::channel_mmd_linear`` → (loss, sq_x,
  sq_y, sums).

Each forward operator returns the loss and the tensors its ``_backward`` operator takes (the
schemas in csrc/kdfast.cpp and below name and document them); each (path, backend) pair is one
autograd Function (:func:`channel_mmd_function`), so a backward knows its path from its class.
A backward with ``create_graph=True`` differentiates the reference instead
(:mod:`kdfast.ops._higher_order`). The Triton operators' bodies import their kernels
(:mod:`kdfast.triton.mmd`, and with it Triton) on their first call only.

Both backends are registered at the bottom of this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from kdfast import backends
from kdfast.ops._higher_order import creates_graph, needs_autograd, reference_grads
from kdfast.ops._triton_common import TRITON_NAMESPACE, empty_accumulation, grad_or_empty
from kdfast.reference.nst import (
    as_bandwidths,
    channel_mmd,
    check_unbiased_sizes,
    feature_gram_mmd,
    unit_channels,
)
from kdfast.triton import supports

CORE = "channel_mmd"

# The three algorithms (paths) of channel MMD.
GRAM, FEATURE_GRAM, LINEAR = "gram", "feature_gram", "linear"
PATHS = (GRAM, FEATURE_GRAM, LINEAR)

# The native kernels take at most this many rbf bandwidths (kMmdMaxBandwidths in math.h).
MAX_BANDWIDTHS = 16


# FEATURE_GRAM takes poly d = 2 when D < FEATURE_GRAM_SHARE · rows. By the flop count the
# switch would sit at D = rows (D × D Grams: rows·D² flops, C × C ones: rows²·D), but the
# native CPU D × D path ran at about 1.5·D/rows of the C × C path's time (one thread, forward
# + backward, B 8-64, C 64-1024, maps 7×7 to 28×28; docs/regression_sweep.md): 0.86 at
# D/rows = 0.61 on 14×14 maps but 1.06 on 28×28, 1.10 at 0.8, 1.4 at 1.0; 5/8 puts the
# 14×14 point (a 14 % win) on the D × D side and costs 6 % at the 28×28 one. Not measured on
# a GPU.
FEATURE_GRAM_SHARE = (5, 8)


def channel_mmd_path(student: Tensor, teacher: Tensor, kernel: str, degree: int,
                     teacher_term: bool) -> str:
    """The algorithm that computes channel MMD for these inputs: the one rule, used by every
    backend and by the reference (:func:`kdfast.reference.nst.channel_mmd`).

    ``LINEAR`` for the linear kernel; ``FEATURE_GRAM`` for poly d = 2 when D = H·W < 5/8 of
    rows = C_s (+ C_t with the teacher term), where D × D Grams cost about rows·D² flops and
    D² memory per sample against rows²·D and rows² for the C × C ones (the 5/8:
    :data:`FEATURE_GRAM_SHARE`); else ``GRAM``.
    """
    if kernel == "linear":
        return LINEAR
    rows = student.shape[1] + (teacher.shape[1] if teacher_term else 0)
    numerator, denominator = FEATURE_GRAM_SHARE
    if (kernel == "poly" and degree == 2
            and denominator * student.shape[2] * student.shape[3] < numerator * rows):
        return FEATURE_GRAM
    return GRAM


class MMDOptions(NamedTuple):
    """The options of every path's Function, as its operators take them."""

    kernel: str
    degree: int
    coef: float
    bandwidths: list[float]  # the σ² values; empty for sigma2="mean"
    sigma_mean: bool
    unbiased: bool
    teacher_term: bool

    @classmethod
    def of(cls, kernel: str, degree: int, coef: float, sigma2, unbiased: bool,
           teacher_term: bool) -> MMDOptions:
        sigma2 = as_bandwidths(sigma2)
        sigma_mean = sigma2 == "mean"
        return cls(kernel, int(degree), float(coef), [] if sigma_mean else list(sigma2),
                   sigma_mean, bool(unbiased), bool(teacher_term))

    def reference(self) -> dict:
        """The keyword options of :func:`kdfast.reference.nst.channel_mmd`."""
        return dict(kernel=self.kernel, degree=self.degree, coef=self.coef,
                    sigma2="mean" if self.sigma_mean else tuple(self.bandwidths),
                    unbiased=self.unbiased, teacher_term=self.teacher_term)


ForwardOp = Callable[[Tensor, Tensor, MMDOptions, bool, bool], tuple[Tensor, ...]]
BackwardOp = Callable[[Tensor, Tensor, Tensor, tuple[Tensor, ...], MMDOptions, bool, bool],
                      tuple[Tensor, Tensor]]


def channel_mmd_function(name: str, path: str, forward_op: ForwardOp,
                         backward_op: BackwardOp) -> type[torch.autograd.Function]:
    """The autograd Function of one path on one backend, applied as
    ``Function.apply(student, teacher, *MMDOptions)``.

    ``forward_op(student, teacher, options, need_student, need_teacher) -> (loss, *saved)``;
    ``backward_op(grad, student, teacher, saved, options, need_student, need_teacher) ->
    (d_student, d_teacher)`` (each empty where not needed). ``Function.path`` names the path;
    ``Function.forward_op`` is the forward, for calls that record no graph.
    """

    def forward(ctx, student, teacher, *options):
        need_student, need_teacher = ctx.needs_input_grad[:2]
        loss, *saved = forward_op(student, teacher, MMDOptions(*options), need_student,
                                  need_teacher)
        ctx.options = options
        ctx.save_for_backward(student, teacher, *saved)
        return loss

    def backward(ctx, grad_loss):
        student, teacher, *saved = ctx.saved_tensors
        need_student, need_teacher = ctx.needs_input_grad[:2]
        options = MMDOptions(*ctx.options)
        unused = (None,) * len(options)
        if creates_graph():
            reference = options.reference()
            return *reference_grads(lambda s, t: channel_mmd(s, t, **reference),
                                    (student, teacher), (need_student, need_teacher),
                                    grad_loss), *unused
        d_student, d_teacher = backward_op(grad_loss.contiguous(), student, teacher,
                                           tuple(saved), options, need_student, need_teacher)
        return (d_student if need_student else None, d_teacher if need_teacher else None,
                *unused)

    # Built by type() so that the class, and its graph node "<name>Backward", carry the name.
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "path": path,
        "forward_op": staticmethod(forward_op),
        "__qualname__": name, "__module__": __name__,
        "__doc__": f"Channel MMD, path {path!r}: {forward_op.__name__} / {backward_op.__name__}."})


# --- FEATURE_GRAM in torch ------------------------------------------------------------------

def feature_gram_channel_mmd(student: Tensor, teacher: Tensor, *, coef: float = 0.0,
                             unbiased: bool = False, teacher_term: bool = True) -> Tensor:
    """The ``FEATURE_GRAM`` path (poly d = 2) in torch operations, (B,): one batched matmul
    per set, X̂ᵀX̂ and ŶᵀŶ (D × D), and the row sums (:func:`kdfast.reference.nst.
    feature_gram_mmd`), differentiated by autograd. What native CUDA and Triton run on maps
    smaller than the channel count: (C_s + C_t)/D times fewer flops than any C × C kernel and
    no B·C² blocks (e.g. 52× at 7×7 with C = 512 + 2048); chosen by that count, not yet
    measured on a GPU."""
    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    return feature_gram_mmd(unit_channels(student), unit_channels(teacher), coef, unbiased,
                            teacher_term)


# --- native: torch.ops.kdfast.channel_mmd_{gram,feature_gram,linear} (csrc/kdfast.cpp) ------

def _native_gram_forward(student, teacher, o: MMDOptions, need_student, need_teacher):
    return torch.ops.kdfast.channel_mmd_gram(student, teacher, o.kernel, o.degree, o.coef,
                                             o.bandwidths, o.sigma_mean, o.unbiased,
                                             o.teacher_term, need_student, need_teacher)


def _native_gram_backward(grad, student, teacher, saved, o: MMDOptions, need_student,
                          need_teacher):
    m_ss, m_st, m_tt, row_scale = saved
    return torch.ops.kdfast.channel_mmd_gram_backward(grad, student, teacher, m_ss, m_st, m_tt,
                                                      row_scale, need_student, need_teacher)


def _native_feature_gram_forward(student, teacher, o: MMDOptions, need_student, need_teacher):
    return torch.ops.kdfast.channel_mmd_feature_gram(student, teacher, o.coef, o.unbiased,
                                                     o.teacher_term)


def _native_feature_gram_backward(grad, student, teacher, saved, o: MMDOptions, need_student,
                                  need_teacher):
    feature_weights, feature_offsets, inv_norm_x, inv_norm_y = saved
    return torch.ops.kdfast.channel_mmd_feature_gram_backward(
        grad, student, teacher, feature_weights, feature_offsets, inv_norm_x, inv_norm_y,
        o.coef, o.unbiased, o.teacher_term, need_student, need_teacher)


def _native_linear_forward(student, teacher, o: MMDOptions, need_student, need_teacher):
    return torch.ops.kdfast.channel_mmd_linear(student, teacher, o.unbiased, o.teacher_term)


def _native_linear_backward(grad, student, teacher, saved, o: MMDOptions, need_student,
                            need_teacher):
    sum_x, sum_y, inv_norm_x, inv_norm_y = saved
    return torch.ops.kdfast.channel_mmd_linear_backward(
        grad, student, teacher, sum_x, sum_y, inv_norm_x, inv_norm_y, o.unbiased,
        o.teacher_term, need_student, need_teacher)


NativeGramMMD = channel_mmd_function("NativeGramMMD", GRAM, _native_gram_forward,
                                     _native_gram_backward)
NativeFeatureGramMMD = channel_mmd_function("NativeFeatureGramMMD", FEATURE_GRAM,
                                            _native_feature_gram_forward,
                                            _native_feature_gram_backward)
NativeLinearMMD = channel_mmd_function("NativeLinearMMD", LINEAR, _native_linear_forward,
                                       _native_linear_backward)


def native_channel_mmd(student: Tensor, teacher: Tensor, *, kernel: str = "poly",
                       degree: int = 2, coef: float = 0.0, sigma2=(1.0,), unbiased: bool = False,
                       teacher_term: bool = True) -> Tensor:
    """:func:`kdfast.reference.nst.channel_mmd` computed by the native kernels of the path
    :func:`channel_mmd_path` picks; (B,). ``FEATURE_GRAM`` on CUDA (no CUDA kernel of its
    own) runs :func:`feature_gram_channel_mmd`."""
    if backends.native_extension() is None:
        raise RuntimeError("kdfast's native extension is not built; use the reference backend")
    path = channel_mmd_path(student, teacher, kernel, degree, teacher_term)
    if path == FEATURE_GRAM and student.device.type == "cuda":
        return feature_gram_channel_mmd(student, teacher, coef=coef, unbiased=unbiased,
                                        teacher_term=teacher_term)
    function = {GRAM: NativeGramMMD, FEATURE_GRAM: NativeFeatureGramMMD,
                LINEAR: NativeLinearMMD}[path]
    options = MMDOptions.of(kernel, degree, coef, sigma2, unbiased, teacher_term)
    if not needs_autograd(student, teacher):  # no graph: the forward op alone, nothing kept
        return function.forward_op(student, teacher, options, False, False)[0]
    return function.apply(student, teacher, *options)


def native_channel_mmd_checked(student, teacher, *, kernel: str = "poly", degree: int = 2,
                               sigma2=(1.0,), teacher_term: bool = True, **options):
    """The registered native fn: :func:`native_channel_mmd`, except that more rbf bandwidths
    than the kernels take go to the reference."""
    options.update(kernel=kernel, degree=degree, sigma2=sigma2, teacher_term=teacher_term)
    if not isinstance(sigma2, (str, int, float)) and len(sigma2) > MAX_BANDWIDTHS:
        return channel_mmd(student, teacher, **options)
    return native_channel_mmd(student, teacher, **options)


# Fakes of the native operators (shapes for torch.compile), one per schema of csrc/kdfast.cpp.

def _fake_native_gram(student, teacher, kernel, degree, coef, sigma2, sigma_mean, unbiased,
                      teacher_term, grad_student, grad_teacher):
    """(loss (B,), m_ss (B, m, m) or (0,), m_st (B, m, n), m_tt (B, n, n) or (0,),
    row_scale (B,)), m_ss / m_tt only where that gradient is wanted."""
    batch, m, n = student.shape[0], student.shape[1], teacher.shape[1]
    new = partial(empty_accumulation, student)
    return (new(batch), new(batch, m, m) if grad_student else new(0), new(batch, m, n),
            new(batch, n, n) if grad_teacher else new(0), new(batch))


def _fake_native_feature_gram(student, teacher, coef, unbiased, teacher_term):
    """(loss (B,), feature_weights (B, 2, D, D), feature_offsets (B, 2, D), inv_norm_x (B, m),
    inv_norm_y (B, n))."""
    batch, m, n = student.shape[0], student.shape[1], teacher.shape[1]
    hw = student.shape[2] * student.shape[3]
    new = partial(empty_accumulation, student)
    return new(batch), new(batch, 2, hw, hw), new(batch, 2, hw), new(batch, m), new(batch, n)


def _fake_native_linear(student, teacher, unbiased, teacher_term):
    """(loss (B,), sum_x (B, D), sum_y (B, D), inv_norm_x (B, m), inv_norm_y (B, n))."""
    batch, m, n = student.shape[0], student.shape[1], teacher.shape[1]
    hw = student.shape[2] * student.shape[3]
    new = partial(empty_accumulation, student)
    return new(batch), new(batch, hw), new(batch, hw), new(batch, m), new(batch, n)


def _fake_gradients(student, teacher, grad_student, grad_teacher):
    """(d student, d teacher) of every path's backward: the inputs' shapes, or (0,)."""
    return (student.new_empty(student.shape) if grad_student else student.new_empty(0),
            teacher.new_empty(teacher.shape) if grad_teacher else teacher.new_empty(0))


def _fake_native_gram_backward(grad, student, teacher, m_ss, m_st, m_tt, row_scale,
                               grad_student, grad_teacher):
    return _fake_gradients(student, teacher, grad_student, grad_teacher)


def _fake_native_feature_gram_backward(grad, student, teacher, feature_weights,
                                       feature_offsets, inv_norm_x, inv_norm_y, coef, unbiased,
                                       teacher_term, grad_student, grad_teacher):
    return _fake_gradients(student, teacher, grad_student, grad_teacher)


def _fake_native_linear_backward(grad, student, teacher, sum_x, sum_y, inv_norm_x, inv_norm_y,
                                 unbiased, teacher_term, grad_student, grad_teacher):
    return _fake_gradients(student, teacher, grad_student, grad_teacher)


# --- Triton: kdfast_triton::channel_mmd_{gram,linear} over kdfast.triton.mmd ----------------

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
    """The normalised Gram blocks the Triton MMD forward keeps for the backward: dX needs ss
    and st, dY st and tt (B·C² each); none where the backward recomputes them."""
    if recomputes_grams(x):
        return set()
    return {name for name, needed in [("ss", need_x), ("st", need_x or need_y),
                                      ("tt", need_y and teacher_term)] if needed}


@torch.library.custom_op(f"{TRITON_NAMESPACE}::channel_mmd_linear", mutates_args=())
def _triton_linear(x: Tensor, y: Tensor, unbiased: bool,
                   teacher_term: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (B,), sq_x (B, m), sq_y (B, n) squared row norms, sums = [Σ x̂_i; Σ ŷ_j]
    (B, 2, D))."""
    from kdfast.triton import mmd as kernels
    return kernels.linear_mmd_forward(x, y, unbiased, teacher_term)


@_triton_linear.register_fake
def _(x, y, unbiased, teacher_term):
    batch, hw = x.shape[0], x.shape[2] * x.shape[3]
    new = partial(empty_accumulation, x)
    return new(batch), new(batch, x.shape[1]), new(batch, y.shape[1]), new(batch, 2, hw)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::channel_mmd_linear_backward", mutates_args=())
def _triton_linear_backward(grad_loss: Tensor, x: Tensor, y: Tensor, sq_x: Tensor,
                            sq_y: Tensor, sums: Tensor, unbiased: bool, teacher_term: bool,
                            need_x: bool, need_y: bool) -> tuple[Tensor, Tensor]:
    from kdfast.triton import mmd as kernels
    return kernels.linear_mmd_backward(grad_loss, x, y, sq_x, sq_y, sums, unbiased,
                                       teacher_term, need_x, need_y)


@_triton_linear_backward.register_fake
def _(grad_loss, x, y, sq_x, sq_y, sums, unbiased, teacher_term, need_x, need_y):
    return grad_or_empty(x, need_x), grad_or_empty(y, need_y)


@torch.library.custom_op(f"{TRITON_NAMESPACE}::channel_mmd_gram", mutates_args=())
def _triton_gram(x: Tensor, y: Tensor, kernel: str, degree: int, coef: float,
                 bandwidths: list[float], sigma_mean: bool, unbiased: bool, teacher_term: bool,
                 need_x: bool, need_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor]:
    """(loss (B,), sq_x (B, m), sq_y (B, n), sigmas (B, S) the σ² per sample, and the
    normalised Gram blocks g_ss (B, m, m), g_st (B, m, n), g_tt (B, n, n) the backward reads,
    (B, 0, 0) where it needs none (:func:`kept_gram_blocks`))."""
    from kdfast.triton import mmd as kernels
    sigma2 = "mean" if sigma_mean else tuple(bandwidths)
    return kernels.channel_mmd_forward(x, y, kernel, degree, coef, sigma2, unbiased,
                                       teacher_term, need_x, need_y)


@_triton_gram.register_fake
def _(x, y, kernel, degree, coef, bandwidths, sigma_mean, unbiased, teacher_term, need_x,
      need_y):
    batch, m, n = x.shape[0], x.shape[1], y.shape[1]
    num_sigma = len(bandwidths) if kernel == "rbf" and not sigma_mean else 1
    kept = kept_gram_blocks(x, need_x, need_y, teacher_term)
    new = partial(empty_accumulation, x)

    def block(name: str, rows: int, cols: int) -> Tensor:
        return new(batch, rows, cols) if name in kept else new(batch, 0, 0)
    return (new(batch), new(batch, m), new(batch, n), new(batch, num_sigma),
            block("ss", m, m), block("st", m, n), block("tt", n, n))


@torch.library.custom_op(f"{TRITON_NAMESPACE}::channel_mmd_gram_backward", mutates_args=())
def _triton_gram_backward(grad_loss: Tensor, x: Tensor, y: Tensor, sq_x: Tensor, sq_y: Tensor,
                          sigmas: Tensor, g_ss: Tensor, g_st: Tensor, g_tt: Tensor, kernel: str,
                          degree: int, coef: float, unbiased: bool, teacher_term: bool,
                          need_x: bool, need_y: bool) -> tuple[Tensor, Tensor]:
    from kdfast.triton import mmd as kernels
    return kernels.channel_mmd_backward(grad_loss, x, y, sq_x, sq_y, sigmas, g_ss, g_st, g_tt,
                                        kernel, degree, coef, unbiased, teacher_term, need_x,
                                        need_y)


@_triton_gram_backward.register_fake
def _(grad_loss, x, y, sq_x, sq_y, sigmas, g_ss, g_st, g_tt, kernel, degree, coef, unbiased,
      teacher_term, need_x, need_y):
    return grad_or_empty(x, need_x), grad_or_empty(y, need_y)


def _triton_gram_forward(student, teacher, o: MMDOptions, need_student, need_teacher):
    return _triton_gram(student, teacher, o.kernel, o.degree, o.coef, o.bandwidths,
                        o.sigma_mean, o.unbiased, o.teacher_term, need_student, need_teacher)


def _triton_gram_backward_op(grad, student, teacher, saved, o: MMDOptions, need_student,
                             need_teacher):
    sq_x, sq_y, sigmas, g_ss, g_st, g_tt = saved
    return _triton_gram_backward(grad, student, teacher, sq_x, sq_y, sigmas, g_ss, g_st, g_tt,
                                 o.kernel, o.degree, o.coef, o.unbiased, o.teacher_term,
                                 need_student, need_teacher)


def _triton_linear_forward(student, teacher, o: MMDOptions, need_student, need_teacher):
    return _triton_linear(student, teacher, o.unbiased, o.teacher_term)


def _triton_linear_backward_op(grad, student, teacher, saved, o: MMDOptions, need_student,
                               need_teacher):
    sq_x, sq_y, sums = saved
    return _triton_linear_backward(grad, student, teacher, sq_x, sq_y, sums, o.unbiased,
                                   o.teacher_term, need_student, need_teacher)


TritonGramMMD = channel_mmd_function("TritonGramMMD", GRAM, _triton_gram_forward,
                                     _triton_gram_backward_op)
TritonLinearMMD = channel_mmd_function("TritonLinearMMD", LINEAR, _triton_linear_forward,
                                       _triton_linear_backward_op)


def triton_channel_mmd(student: Tensor, teacher: Tensor, *, kernel: str = "poly",
                       degree: int = 2, coef: float = 0.0, sigma2=(1.0,),
                       unbiased: bool = False, teacher_term: bool = True) -> Tensor:
    """Core ``"channel_mmd"`` on Triton: per-sample MMD² (B,), same options as the reference
    :func:`kdfast.reference.nst.channel_mmd`; ``FEATURE_GRAM`` runs
    :func:`feature_gram_channel_mmd` (no Triton kernel of its own)."""
    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    path = channel_mmd_path(student, teacher, kernel, degree, teacher_term)
    if path == FEATURE_GRAM:
        return feature_gram_channel_mmd(student, teacher, coef=coef, unbiased=unbiased,
                                        teacher_term=teacher_term)
    function = TritonLinearMMD if path == LINEAR else TritonGramMMD
    return function.apply(student, teacher,
                          *MMDOptions.of(kernel, degree, coef, sigma2, unbiased, teacher_term))


# --- registration ---------------------------------------------------------------------------

backends.register_native_fake("channel_mmd_gram", _fake_native_gram)
backends.register_native_fake("channel_mmd_gram_backward", _fake_native_gram_backward)
backends.register_native_fake("channel_mmd_feature_gram", _fake_native_feature_gram)
backends.register_native_fake("channel_mmd_feature_gram_backward",
                              _fake_native_feature_gram_backward)
backends.register_native_fake("channel_mmd_linear", _fake_native_linear)
backends.register_native_fake("channel_mmd_linear_backward", _fake_native_linear_backward)

backends.register(CORE, "reference", channel_mmd)
backends.register(CORE, "native", native_channel_mmd_checked, backends.native_supports)
backends.register(CORE, "triton", triton_channel_mmd, supports)

"""Native channel MMD (NST) against the reference: values and gradients of every kernel and
option, the poly-2 feature-Gram path, numerics (tiny bandwidths, overflowing squared norms,
non-finite inputs). Low precision and random shapes (CPU and CUDA) are in
tests/test_parity.py."""

import functools

import pytest
import torch

import kdfast
from kdfast.ops.mmd import (
    FEATURE_GRAM,
    GRAM,
    LINEAR,
    PATHS,
    channel_mmd_path,
    native_channel_mmd,
)
from kdfast.reference.nst import channel_mmd
from tests.helpers import assert_matches_reference, assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

KERNELS = [
    {"kernel": "linear"},
    *({"kernel": "poly", "degree": d, "coef": c} for d in (1, 2, 3) for c in (0.0, 0.5)),
    {"kernel": "rbf", "sigma2": (1.0,)},
    {"kernel": "rbf", "sigma2": (0.5, 2.0)},
    {"kernel": "rbf", "sigma2": "mean"},
]
KERNEL_IDS = ["linear", *(f"poly{d}-c{c}" for d in (1, 2, 3) for c in (0, 0.5)),
              "rbf", "rbf-multi", "rbf-mean"]
NO_CUDA = not (torch.cuda.is_available() and kdfast.available_backends()["native_cuda"])
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs CUDA and the native CUDA kernels")])]


def compare(student, teacher, tol, atol=1e-13, grad_output=None, **options):
    """Native vs the float64 reference on the same inputs, value and every gradient, by
    tests.helpers.assert_matches_reference: float64 within ``tol`` (+ ``atol``), lower dtypes
    by its one rule; ``grad_output`` default 0.5 ... 2.0 over the samples."""
    def weights(value):
        if grad_output is not None:
            return grad_output
        return torch.linspace(0.5, 2.0, value.numel(), dtype=torch.float64).to(value.dtype)
    assert_matches_reference(functools.partial(native_channel_mmd, **options),
                             functools.partial(channel_mmd, **options), [student, teacher],
                             grad_output=weights, rtol64=tol, atol=atol)


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("teacher_term", [True, False], ids=["tt", "no-tt"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-fixed", "t-grad"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_float64(options, unbiased, teacher_term, teacher_grad, device):
    student = randn(2, 5, 3, 5, requires_grad=True).to(device)
    teacher = randn(2, 7, 3, 5).to(device).requires_grad_(teacher_grad)
    compare(student, teacher, 1e-10, unbiased=unbiased, teacher_term=teacher_term, **options)


SHAPES = {
    "batch-1": ((1, 6, 4, 4), (1, 6, 4, 4)),
    "odd-c-and-hw": ((3, 9, 5, 3), (3, 13, 5, 3)),
    "hw-below-channels": ((2, 17, 2, 3), (2, 11, 2, 3)),
    "batch-1-hw-below-channels": ((1, 9, 2, 3), (1, 7, 2, 3)),
    "hw-1": ((2, 4, 1, 1), (2, 3, 1, 1)),
    "one-channel": ((2, 1, 3, 3), (2, 2, 3, 3)),
    "panels": ((2, 70, 3, 3), (2, 130, 3, 3)),
}


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("options", [KERNELS[0], KERNELS[3], KERNELS[-3], KERNELS[-1]],
                         ids=["linear", "poly2", "rbf", "rbf-mean"])
def test_awkward_shapes(shapes, options):
    student, teacher = randn(*shapes[0]), randn(*shapes[1])
    atol = 1e-13
    if shapes[0][2] * shapes[0][3] == 1:
        # HW = 1: every channel normalises to ±1 and the exact gradient is 0 (rounding noise
        # only). Both signs in every sample, or sigma2="mean" is 0 (floored at 1e-12) and
        # amplifies that noise by 1e12 in both implementations.
        student[:, 0], teacher[:, 0] = student[:, 0].abs(), -teacher[:, 0].abs()
        atol = 1e-9
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, atol=atol, **options)


LAYOUTS = ["channels_last", "transposed", "sliced"]


def non_contiguous_pair(layout: str, batch: int, s_channels: int, t_channels: int):
    """(student, teacher) of shape (batch, C, 5, 4), neither contiguous, in ``layout``."""
    if layout == "channels_last":
        return (randn(batch, s_channels, 5, 4).to(memory_format=torch.channels_last),
                randn(batch, t_channels, 5, 4).to(memory_format=torch.channels_last))
    if layout == "transposed":
        return (randn(batch, s_channels, 4, 5).transpose(2, 3),
                randn(batch, t_channels, 4, 5).transpose(2, 3))
    return randn(batch, 2 * s_channels, 5, 4)[:, ::2], randn(batch, t_channels, 5, 6)[..., 1:5]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", [KERNELS[0], KERNELS[-3]], ids=["linear", "rbf"])
def test_non_contiguous_inputs(layout, options):
    student, teacher = non_contiguous_pair(layout, 2, 6, 9)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, **options)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_linear_rows_in_several_blocks(layout, unbiased):
    # The CPU linear forward sums s over blocks of 256 rows (kLinearRowBlock in
    # csrc/cpu/mmd_linear.cpp): 300 and 520 channels are 2 and 3 blocks, one zero channel.
    student, teacher = randn(2, 300, 2, 3), randn(2, 520, 2, 3)
    student[1, 270] = 0
    if layout == "channels_last":
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, kernel="linear",
            unbiased=unbiased)


def test_linear_forward_does_not_depend_on_the_thread_count():
    student, teacher = randn(3, 600, 7, 7).float(), randn(3, 1100, 7, 7).float()
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(torch.ops.kdfast.channel_mmd_linear(student, teacher, True, True))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*outputs, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
def test_grad_output_per_sample(options):
    student = randn(3, 6, 4, 3, requires_grad=True)
    teacher = randn(3, 5, 4, 3, requires_grad=True)
    compare(student, teacher, 1e-10, grad_output=torch.tensor([-1.5, 0.0, 3.0],
                                                              dtype=torch.float64), **options)


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_all_zero_channels(options, unbiased):
    student, teacher = randn(2, 5, 4, 4), randn(2, 6, 4, 4)
    student[0, 1] = 0
    teacher[1, 2] = 0
    teacher[1, 4] = 0
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, unbiased=unbiased,
            **options)


# sigma2="mean" is detached by definition, so finite differences (which move it) disagree.
@pytest.mark.parametrize("options", KERNELS[:-1], ids=KERNEL_IDS[:-1])
def test_gradcheck(options):
    student = randn(2, 3, 2, 3, requires_grad=True)
    teacher = randn(2, 4, 2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, t: native_channel_mmd(s, t, unbiased=True, **options), (student, teacher))


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_float32(options, device):
    student = randn(3, 37, 7, 9).float().to(device).requires_grad_()
    teacher = randn(3, 29, 7, 9).float().to(device).requires_grad_()
    compare(student, teacher, 1e-5 if device == "cpu" else 5e-4, atol=1e-7, **options)


ONE_PASS = [{"kernel": "rbf", "sigma2": (0.7,)}, {"kernel": "poly", "degree": 2, "coef": 0.5},
            {"kernel": "poly", "degree": 3, "coef": 0.0}]


@pytest.mark.parametrize("options", ONE_PASS, ids=["rbf", "poly2", "poly3"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-fixed", "t-grad"])
def test_float32_one_pass_epilogue(options, unbiased, teacher_grad):
    # fp32 C x C Grams (H·W = 63 > C_s + C_t) take the one-pass epilogues (rbf: one bandwidth);
    # a fixed teacher their no-gradient variant for G_tt; all-zero channels clamp rbf's
    # distance (q = 0).
    student, teacher = randn(3, 31, 7, 9).float(), randn(3, 29, 7, 9).float()
    student[0, 3] = 0
    teacher[2, 5] = 0
    compare(student.requires_grad_(), teacher.requires_grad_(teacher_grad), 1e-5, atol=1e-7,
            unbiased=unbiased, **options)


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
def test_deterministic(options):
    student = randn(5, 70, 6, 6).float().requires_grad_()
    teacher = randn(5, 66, 6, 6).float().requires_grad_()
    runs = []
    for _ in range(2):
        out = native_channel_mmd(student, teacher, **options)
        runs.append((out, *torch.autograd.grad(out.sum(), (student, teacher))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_nst_loss_dispatches_to_native():
    student = randn(2, 6, 4, 4, requires_grad=True)
    teacher = randn(2, 8, 4, 4)
    native = kdfast.functional.nst_loss(student, teacher, kernel="rbf", backend="native")
    reference = kdfast.functional.nst_loss(student, teacher, kernel="rbf", backend="reference")
    assert_rel_close(native, reference, 1e-12)
    assert kdfast.backends.choose("channel_mmd", "auto", student, teacher).backend == "native"


def test_unbiased_needs_two_channels():
    with pytest.raises(RuntimeError, match="at least 2 channels"):
        native_channel_mmd(randn(1, 1, 3, 3), randn(1, 4, 3, 3), unbiased=True)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_torch_compile_fullgraph(kernel):
    student = randn(2, 6, 4, 4, requires_grad=True)
    teacher = randn(2, 5, 4, 4)
    compiled = torch.compile(lambda s, t: native_channel_mmd(s, t, kernel=kernel), fullgraph=True)
    out = compiled(student, teacher)
    (grad,) = torch.autograd.grad(out.sum(), student)
    eager = native_channel_mmd(student, teacher, kernel=kernel)
    (eager_grad,) = torch.autograd.grad(eager.sum(), student)
    assert torch.equal(out, eager) and torch.equal(grad, eager_grad)


@pytest.mark.parametrize("coef", [0.0, 0.5])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("teacher_term", [True, False], ids=["tt", "no-tt"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_poly2_feature_gram_path(coef, unbiased, teacher_term, layout):
    # H·W = 6 < 5/8 C_s (< 5/8 (C_s + C_t)): the native CPU kernel (like the reference) uses
    # the D x D Grams, with and without the teacher term.
    student, teacher = randn(2, 11, 2, 3), randn(2, 7, 2, 3)
    assert channel_mmd_path(student, teacher, "poly", 2, teacher_term) == FEATURE_GRAM
    if layout == "channels_last":
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    student[1, 4] = 0  # an all-zero channel
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, kernel="poly", degree=2,
            coef=coef, unbiased=unbiased, teacher_term=teacher_term)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_poly2_feature_gram_path_non_contiguous(layout):
    # H·W = 20 < 5/8 (C_s + C_t): rows read through strides (channels_last) or from a copy.
    student, teacher = non_contiguous_pair(layout, 3, 21, 19)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-10, kernel="poly", degree=2,
            coef=0.5, unbiased=True)


def test_poly2_feature_gram_path_threads():
    # With 2 threads the samples run in parallel tasks (each with its own scratch), with 1 one
    # after another: the same values and gradients, bitwise.
    student, teacher = randn(4, 21, 3, 3).float(), randn(4, 18, 3, 3).float()
    previous = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
            out = native_channel_mmd(s, t, kernel="poly", unbiased=True)
            runs.append((out, *torch.autograd.grad(out.sum(), (s, t))))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    compare(student.double().requires_grad_(), teacher.double().requires_grad_(), 1e-10,
            kernel="poly", unbiased=True)


def test_poly2_feature_gram_path_compiles():
    student, teacher = randn(2, 9, 2, 3, requires_grad=True), randn(2, 7, 2, 3)
    compiled = torch.compile(lambda s, t: native_channel_mmd(s, t, kernel="poly"), fullgraph=True)
    out = compiled(student, teacher)
    (grad,) = torch.autograd.grad(out.sum(), student)
    (want,) = torch.autograd.grad(channel_mmd(student, teacher, kernel="poly").sum(), student)
    assert_rel_close(out, channel_mmd(student, teacher, kernel="poly"), 1e-12)
    assert_rel_close(grad, want, 1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA and the native CUDA kernels")
def test_registered_cuda_poly2_on_small_maps_takes_the_feature_grams():
    s, t = randn(2, 7, 3, 2).cuda(), randn(2, 4, 3, 2).cuda()  # D = 6 < 11 rows
    registered = kdfast.backends.implementations("channel_mmd")["native"].fn
    assert torch.equal(registered(s, t, kernel="poly"), channel_mmd(s, t, kernel="poly"))


# --- numerics: tiny bandwidths, overflowing squared norms, non-finite inputs -----------------

@pytest.mark.parametrize("sigma2", [1e-8, 1e-10, (1e-10, 1e-9)], ids=["1e-8", "1e-10", "multi"])
def test_float32_rbf_tiny_bandwidth_unbiased_is_zero(sigma2):
    # Distinct unit rows are ≥ 0.1 apart: every off-diagonal kernel exp(−dist/2σ²) is 0 in
    # float64. The float32 exponential used to floor its argument at −87 with a branch-free
    # max that cancels for |x| ≫ 87 (x = −1e10 became 0 or ±512): 1, 5e35 or inf instead.
    student, teacher = randn(2, 6, 5, 7).float(), randn(2, 5, 5, 7).float()
    compare(student.requires_grad_(), teacher.requires_grad_(), 1e-5, atol=1e-6,
            kernel="rbf", sigma2=sigma2, unbiased=True)


@pytest.mark.parametrize("sigma2", [1e-8, 1e-10])
def test_float32_rbf_tiny_bandwidth_biased_stays_in_range(sigma2):
    # Biased, the diagonal terms exp(−max(2 − 2ĝ_ii, 0)/2σ²) are rounding noise in float32
    # (2 − 2ĝ_ii is ±1e-7, not 0) for the reference too; every term lies in [0, 1] and the
    # cross terms are 0, so MMD² must lie in [0, 1/m + 1/n].
    student, teacher = randn(3, 6, 5, 7).float(), randn(3, 5, 5, 7).float()
    out = native_channel_mmd(student.requires_grad_(), teacher, kernel="rbf", sigma2=sigma2)
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert torch.all(out >= 0) and torch.all(out <= 1 / 6 + 1 / 5 + 1e-6)
    assert torch.isfinite(grad).all()


def test_float32_rbf_mean_bandwidth_on_nearly_identical_rows():
    # sigma2="mean" shrinks to the floor 1e-12 when every row is nearly the same.
    base = randn(2, 1, 5, 7)
    student = (base + 1e-9 * randn(2, 4, 5, 7)).float()
    teacher = (base + 1e-9 * randn(2, 3, 5, 7)).float()
    out = native_channel_mmd(student.requires_grad_(), teacher, kernel="rbf", sigma2="mean")
    (grad,) = torch.autograd.grad(out.sum(), student)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.all(out.abs() <= 2.0)


def compare_scaled(student, teacher, scale, tol, **options):
    """Native on float32 ``scale ×`` the inputs against the float64 reference on the inputs
    (NST is scale-invariant: same value, gradients divided by scale)."""
    ref_inputs = [x.detach().double().requires_grad_() for x in (student, teacher)]
    ref = channel_mmd(*ref_inputs, **options)
    big = [(x.detach().double() * scale).float().requires_grad_() for x in (student, teacher)]
    out = native_channel_mmd(*big, **options)
    assert_rel_close(out, ref, tol, "value", 1e-7)
    weights = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64)
    got = torch.autograd.grad(out, big, weights.float())
    want = torch.autograd.grad(ref, ref_inputs, weights)
    for name, g_out, g_ref in zip(("student", "teacher"), got, want, strict=True):
        assert_rel_close(g_out.double() * scale, g_ref, tol, f"{name} gradient", 1e-7)


OVERFLOW_KERNELS = [*KERNELS, {"kernel": "poly", "degree": 2, "teacher_term": False},
                    {"kernel": "rbf", "sigma2": "mean", "teacher_term": False}]
OVERFLOW_IDS = [*KERNEL_IDS, "poly2-no-tt", "rbf-mean-no-tt"]


@pytest.mark.parametrize("options", OVERFLOW_KERNELS, ids=OVERFLOW_IDS)
@pytest.mark.parametrize("scale", [2.0**62, 2.0**100], ids=["2^62", "2^100"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_float32_features_whose_squared_norms_overflow(options, scale, unbiased):
    # |x| ~ 2^62: Σ x² over a channel overflows float32 (the raw Gram's diagonal is inf) while
    # the normalised channels, and so MMD², are ordinary: the sample is redone on rows scaled
    # by a power of two (the old kernels returned NaN).
    student, teacher = randn(2, 5, 4, 6), randn(2, 4, 4, 6)
    compare_scaled(student, teacher, scale, 1e-5, unbiased=unbiased, **options)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("teacher_term", [True, False], ids=["tt", "no-tt"])
def test_float32_feature_gram_path_whose_squared_norms_overflow(unbiased, teacher_term):
    # H·W = 6 < 5/8 C_s (< 5/8 (C_s + C_t)): the D × D path normalises rows itself
    # (norm_from_sum_sq).
    compare_scaled(randn(2, 11, 2, 3), randn(2, 7, 2, 3), 2.0**64, 1e-5, kernel="poly",
                   coef=0.5, unbiased=unbiased, teacher_term=teacher_term)


def test_float32_overflow_rescue_is_per_sample_and_keeps_layouts():
    # Only sample 1 overflows (and only its teacher); channels_last inputs; the other sample
    # takes the ordinary path.
    student, teacher = randn(3, 6, 4, 5), randn(3, 7, 4, 5)
    teacher[1] *= 2.0**70
    for kernel in ({"kernel": "poly"}, {"kernel": "rbf", "sigma2": "mean"}):
        ref_inputs = [x.clone().requires_grad_() for x in (student, teacher)]
        ref = channel_mmd(*ref_inputs, **kernel)
        inputs = [x.float().to(memory_format=torch.channels_last).requires_grad_()
                  for x in (student, teacher)]
        out = native_channel_mmd(*inputs, **kernel)
        assert_rel_close(out, ref, 1e-5, "value")
        got = torch.autograd.grad(out.sum(), inputs)
        want = torch.autograd.grad(ref.sum(), ref_inputs)
        assert_rel_close(got[0], want[0], 1e-5, "student gradient")
        assert_rel_close(got[1][1].double() * 2.0**70, want[1][1] * 2.0**70, 1e-5,
                         "teacher gradient (scaled sample)")


@pytest.mark.parametrize("options", [KERNELS[0], KERNELS[3], KERNELS[-1]],
                         ids=["linear", "poly2", "rbf-mean"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_are_not_rescued(options, bad):
    # The rescue is for finite rows only: an inf (or NaN) among overflowing rows stays NaN.
    student = (randn(2, 5, 4, 6) * 2.0**64).float()
    student[0, 2, 1, 1] = bad
    out = native_channel_mmd(student, randn(2, 4, 4, 6).float(), **options)
    assert not torch.isfinite(out[0]) and torch.isfinite(out[1])


# --- one operator pair per path ---------------------------------------------------------------

PATH_CASES = {  # path -> (student shape, teacher shape, options)
    GRAM: ((2, 5, 3, 5), (2, 7, 3, 5), {"kernel": "rbf", "sigma2": (0.5, 2.0)}),
    FEATURE_GRAM: ((2, 9, 2, 3), (2, 7, 2, 3), {"kernel": "poly", "coef": 0.5}),  # D = 6 < 16
    LINEAR: ((2, 5, 3, 5), (2, 7, 3, 5), {"kernel": "linear"}),
}
FUNCTIONS = {GRAM: "NativeGramMMD", FEATURE_GRAM: "NativeFeatureGramMMD",
             LINEAR: "NativeLinearMMD"}


@pytest.mark.parametrize("path", PATHS)
def test_each_path_runs_its_own_function(path):
    s_shape, t_shape, options = PATH_CASES[path]
    student, teacher = randn(*s_shape, requires_grad=True), randn(*t_shape)
    assert channel_mmd_path(student, teacher, options["kernel"], 2, True) == path
    out = native_channel_mmd(student, teacher, **options)
    assert type(out.grad_fn).__name__ == f"{FUNCTIONS[path]}Backward"
    compare(student, teacher.requires_grad_(), 1e-10, **options)


def test_the_path_rule():
    small, large = randn(1, 9, 2, 3), randn(1, 2, 4, 4)  # D = 6, D = 16
    assert channel_mmd_path(small, small, "poly", 2, True) == FEATURE_GRAM  # 6 < 18
    assert channel_mmd_path(small, small, "poly", 3, True) == GRAM
    assert channel_mmd_path(small, small, "rbf", 2, True) == GRAM
    assert channel_mmd_path(small, small, "linear", 2, True) == LINEAR
    assert channel_mmd_path(large, large, "poly", 2, True) == GRAM  # 16 >= 4
    assert channel_mmd_path(randn(1, 7, 2, 3), randn(1, 4, 2, 3), "poly", 2, False) == GRAM
    assert channel_mmd_path(randn(1, 7, 2, 3), randn(1, 4, 2, 3), "poly", 2, True) == FEATURE_GRAM
    # D = 6 < rows = 9 but not below 5/8 of them: the C x C Grams (measured faster there).
    assert channel_mmd_path(randn(1, 5, 2, 3), randn(1, 4, 2, 3), "poly", 2, True) == GRAM


def native_operator_cases(path: str, dtype: torch.dtype, grads: tuple[bool, bool]):
    """(operator, arguments) for the forward and backward operator of ``path``."""
    s_shape, t_shape, _ = PATH_CASES[path]
    x, y = randn(*s_shape).to(dtype), randn(*t_shape).to(dtype)
    grad = randn(s_shape[0])
    ops = torch.ops.kdfast
    if path == GRAM:
        forward = (ops.channel_mmd_gram.default,
                   (x, y, "rbf", 2, 0.0, [0.5, 2.0], False, True, True, *grads))
        saved = forward[0](*forward[1])[1:]
        backward = (ops.channel_mmd_gram_backward.default, (grad, x, y, *saved, *grads))
    elif path == FEATURE_GRAM:
        forward = (ops.channel_mmd_feature_gram.default, (x, y, 0.5, True, False))
        saved = forward[0](*forward[1])[1:]
        backward = (ops.channel_mmd_feature_gram_backward.default,
                    (grad, x, y, *saved, 0.5, True, False, *grads))
    else:
        forward = (ops.channel_mmd_linear.default, (x, y, True, True))
        saved = forward[0](*forward[1])[1:]
        backward = (ops.channel_mmd_linear_backward.default,
                    (grad, x, y, *saved, True, True, *grads))
    return [forward, backward]


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)],
                         ids=["both", "student", "teacher"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_every_native_operator_passes_opcheck(path, dtype, grads):
    # The fakes in kdfast/ops/mmd.py follow each schema of csrc/kdfast.cpp: opcheck compares
    # their shapes, dtypes and strides with the real outputs.
    for op, args in native_operator_cases(path, dtype, grads):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))

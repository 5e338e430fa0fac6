"""Native softmax-KL core against the reference: values and both gradients in float64 at
awkward row lengths, extreme and masked logits, fp16/bf16 inputs, grad_output ≠ 1,
non-contiguous inputs, every divergence, the operator's registration and torch.compile."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.ops.softmax_kl import CORE, KEPT_GRADIENT_MAX_COLUMNS, keeps_gradient, native_softmax_kl
from kdfast.reference.softmax_kl import softmax_kl
from tests.helpers import assert_rel_close, dtype_tolerance, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

NEG_INF = float("-inf")
DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0),
               ("jsd", 1.0)]


def value_and_grads(fn, student, teacher, grad_output, *options):
    loss = fn(student, teacher, *options)
    wanted = [x for x in (student, teacher) if x.requires_grad]
    return loss, torch.autograd.grad(loss, wanted, grad_output)


def assert_matches_reference(student, teacher, temperature=2.0, divergence="forward",
                             beta=0.5, tol=1e-12, seed=0):
    """Native vs reference: the per-row loss and the gradients of every input that requires
    grad, for a random (not all-ones) grad_output."""
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(student.shape[0], generator=generator, dtype=torch.float64)
    grad_output = grad_output.to(torch.float32 if student.dtype != torch.float64 else
                                 torch.float64)
    options = (temperature, divergence, beta)
    ref, ref_grads = value_and_grads(softmax_kl, student, teacher, grad_output, *options)
    out, out_grads = value_and_grads(native_softmax_kl, student, teacher, grad_output, *options)
    assert out.dtype == ref.dtype
    assert_rel_close(out, ref, tol, "value")
    for got, want in zip(out_grads, ref_grads, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_rel_close(got, want, tol, "gradient")


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 3), (5, 17), (3, 1000)])
def test_native_matches_reference_float64(shape, divergence, beta):
    student = randn(*shape, seed=1, requires_grad=True) * 3
    teacher = randn(*shape, seed=2, requires_grad=True) * 3
    assert_matches_reference(student, teacher, 1.7, divergence, beta)


@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_native_long_rows_float64(divergence, beta):
    # Row length 1 000 003: many online-softmax blocks, a ragged last block.
    student = randn(2, 1_000_003, seed=3, requires_grad=True)
    teacher = randn(2, 1_000_003, seed=4, requires_grad=True)
    assert_matches_reference(student, teacher, 1.0, divergence, beta, tol=1e-10)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:4])
def test_native_extreme_logits(divergence, beta):
    student = randn(3, 9, seed=5).sign() * 1e4
    teacher = randn(3, 9, seed=6) * 1e4
    student[:, 0], teacher[:, 0] = 1e4, 1e4  # a shared peak, so the KLs stay finite
    for dtype in (torch.float64, torch.float32):
        s = student.to(dtype).requires_grad_(True)
        t = teacher.to(dtype).requires_grad_(True)
        assert_matches_reference(s, t, 3.0, divergence, beta,
                                 tol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_native_masked_entries(divergence, beta):
    student, teacher = randn(4, 11, seed=7), randn(4, 11, seed=8)
    student[:, [2, 7]] = NEG_INF  # masked in both rows: contribute 0, zero gradient
    teacher[:, [2, 7]] = NEG_INF
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert_matches_reference(student, teacher, 2.0, divergence, beta)
    grads = torch.autograd.grad(native_softmax_kl(student, teacher, 2.0, divergence, beta).sum(),
                                (student, teacher))
    assert all(torch.all(g[:, [2, 7]] == 0) for g in grads)


def test_native_one_sided_mask_and_non_finite_logits():
    student, teacher = randn(4, 6, seed=9), randn(4, 6, seed=10)
    student[0, 1] = NEG_INF  # student −inf where the teacher has mass: +inf, as the KL is
    teacher[1, 2] = float("nan")
    teacher[2, 3] = float("inf")
    for divergence in ("forward", "reverse", "jsd"):
        ref = softmax_kl(student, teacher, 1.0, divergence)
        out = native_softmax_kl(student, teacher, 1.0, divergence)
        torch.testing.assert_close(out, ref, equal_nan=True)
    assert native_softmax_kl(student, teacher, 1.0)[0] == float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_native_low_precision_within_the_reference_rule(dtype, divergence, beta):
    s64, t64 = randn(6, 301, seed=11) * 2, randn(6, 301, seed=12) * 2
    s = s64.to(dtype).requires_grad_(True)
    t = t64.to(dtype).requires_grad_(True)
    exact_s, exact_t = s.detach().double(), t.detach().double()  # the rounded values, exactly
    grad_output = torch.rand(6) + 0.5

    def run(fn, a, b):
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        loss, grads = value_and_grads(fn, a, b, grad_output.to(torch.float32 if
                                      a.dtype != torch.float64 else torch.float64),
                                      2.0, divergence, beta)
        return (loss, *grads)

    got = run(native_softmax_kl, s, t)
    want = run(softmax_kl, exact_s, exact_t)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for i, what in enumerate(("value", "student gradient", "teacher gradient")):
        tol = dtype_tolerance(lambda a, b, i=i: run(softmax_kl, a, b)[i],
                              (exact_s, exact_t), dtype)
        assert_rel_close(got[i], want[i], tol, what)


@pytest.mark.parametrize("layout", ["transposed", "column_slice", "row_slice", "expanded"])
def test_native_non_contiguous_inputs(layout):
    if layout == "transposed":
        student, teacher = randn(9, 4, seed=13).t(), randn(9, 4, seed=14).t()
    elif layout == "column_slice":
        student, teacher = randn(4, 20, seed=13)[:, ::2], randn(4, 20, seed=14)[:, 1::2]
    elif layout == "row_slice":
        student, teacher = randn(8, 10, seed=13)[::2], randn(8, 10, seed=14)[1::2]
    else:
        student, teacher = randn(1, 10, seed=13).expand(4, 10), randn(4, 10, seed=14)
    assert not student.is_contiguous()
    for divergence in ("forward", "reverse", "jsd"):
        assert_matches_reference(student.detach().requires_grad_(True),
                                 teacher.detach().requires_grad_(True), 1.5, divergence)


def test_native_student_only_keeps_teacher_without_gradient():
    student = randn(3, 7, seed=15, requires_grad=True)
    teacher = randn(3, 7, seed=16)
    assert_matches_reference(student, teacher, 4.0)
    loss, d_student, d_teacher = torch.ops.kdfast.softmax_kl(student.detach(), teacher, 4.0,
                                                             "forward", 0.5, True, False)
    assert d_student.shape == (3, 7) and d_teacher.numel() == 0


def test_native_is_deterministic():
    student, teacher = randn(64, 5000, seed=17).float(), randn(64, 5000, seed=18).float()
    first = torch.ops.kdfast.softmax_kl(student, teacher, 2.0, "jsd", 0.4, True, True)
    second = torch.ops.kdfast.softmax_kl(student, teacher, 2.0, "jsd", 0.4, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_native_float64_gradcheck_and_gradgradcheck():
    student = randn(2, 5, seed=19, requires_grad=True)
    teacher = randn(2, 5, seed=20, requires_grad=True)
    for divergence in ("forward", "reverse", "jsd"):
        def fn(s, t, divergence=divergence):
            return native_softmax_kl(s, t, 1.3, divergence, 0.3)
        assert torch.autograd.gradcheck(fn, (student, teacher))
        assert torch.autograd.gradgradcheck(fn, (student, teacher))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_operator_opcheck(dtype):
    student, teacher = randn(3, 6, seed=21).to(dtype), randn(3, 6, seed=22).to(dtype)
    for divergence, flags in (("forward", (True, False)), ("jsd", (True, True)),
                              ("reverse", (False, False))):
        torch.library.opcheck(torch.ops.kdfast.softmax_kl.default,
                              (student, teacher, 2.0, divergence, 0.5, *flags))


def test_kd_losses_pick_native_on_cpu():
    s, t = randn(2, 3), randn(2, 3)
    assert backends.choose(CORE, None, s, t).backend == "native"


def test_kd_loss_compiles_fullgraph_on_native():
    student = randn(4, 10, seed=23, requires_grad=True)
    teacher = randn(4, 10, seed=24, requires_grad=True)

    def loss(s, t):
        return kdfast.functional.kd_loss(s, t, temperature=3.0, backend="native")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(student, teacher)
    ref = kdfast.functional.kd_loss(student, teacher, temperature=3.0, backend="reference")
    assert_rel_close(out, ref, 1e-12, "value")
    got = torch.autograd.grad(out * 1.7, (student, teacher))
    want = torch.autograd.grad(ref * 1.7, (student, teacher))
    for g, w in zip(got, want, strict=True):
        assert_rel_close(g, w, 1e-12, "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_recomputing_operators_opcheck(dtype):
    student, teacher = randn(3, 6, seed=23).to(dtype), randn(3, 6, seed=24).to(dtype)
    for divergence, flags in (("forward", (True, False)), ("jsd", (True, True)),
                              ("reverse", (False, True))):
        torch.library.opcheck(torch.ops.kdfast.softmax_kl_with_stats.default,
                              (student, teacher, 2.0, divergence, 0.4))
        _, row_stats = torch.ops.kdfast.softmax_kl_with_stats(student, teacher, 2.0, divergence,
                                                              0.4)
        grad = randn(3, seed=25).to(row_stats.dtype)
        torch.library.opcheck(torch.ops.kdfast.softmax_kl_backward.default,
                              (grad, student, teacher, row_stats, 2.0, divergence, 0.4, *flags))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_recomputed_gradients_are_the_saved_ones_scaled(divergence, beta):
    # The CPU backward reruns the forward's sweeps: the same gradients as the fused forward
    # saves, times grad_output per row, and the same loss.
    student, teacher = randn(4, 1500, seed=26) * 2, randn(4, 1500, seed=27) * 2
    grad = randn(4, seed=28)
    loss, d_student, d_teacher = torch.ops.kdfast.softmax_kl(student, teacher, 1.5, divergence,
                                                             beta, True, True)
    loss_with_stats, row_stats = torch.ops.kdfast.softmax_kl_with_stats(
        student, teacher, 1.5, divergence, beta)
    grad_s, grad_t = torch.ops.kdfast.softmax_kl_backward(grad, student, teacher, row_stats,
                                                          1.5, divergence, beta, True, True)
    assert torch.equal(loss_with_stats, loss) and row_stats.shape == (4, 6)
    torch.testing.assert_close(grad_s, grad[:, None] * d_student, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad_t, grad[:, None] * d_teacher, rtol=1e-14, atol=0)


def row_sized_saves(loss, *inputs):
    """The tensors of row size the loss's backward node saved, other than the inputs."""
    pointers = {x.data_ptr() for x in inputs}
    return [x for x in loss.grad_fn.saved_tensors
            if x.numel() >= inputs[0].numel() and x.data_ptr() not in pointers]


@pytest.mark.parametrize("case", ["segmentation rows", "teacher grad", "reverse", "fp16"])
def test_native_cpu_forward_saves_nothing_of_row_size(case):
    # Forward + backward then hold one gradient-sized tensor: the gradient itself.
    rows, cols = (2, KEPT_GRADIENT_MAX_COLUMNS + 1) if case == "segmentation rows" else (6, 100)
    dtype = torch.float16 if case == "fp16" else torch.float64
    student = randn(rows, cols, seed=29).to(dtype).requires_grad_()
    teacher = randn(rows, cols, seed=30).to(dtype).requires_grad_(case == "teacher grad")
    loss = native_softmax_kl(student, teacher, 2.0, "reverse" if case == "reverse" else "forward")
    assert row_sized_saves(loss, student, teacher) == []
    assert sum(x.numel() for x in loss.grad_fn.saved_tensors
               if x.data_ptr() not in (student.data_ptr(), teacher.data_ptr())) <= 6 * rows


def test_native_cpu_kd_case_keeps_its_gradient_from_the_forward():
    """Forward KL, a frozen teacher, fp32/fp64 rows of a vocabulary: the forward's gradient
    (kept exps, csrc/cpu/softmax_kl.cpp forward_kl_with_student_grad) is what the first
    backward scales in place; it equals the recomputing backward's, a second backward
    (retain_graph) reruns the kernel (bitwise the same), and no-grad calls keep nothing."""
    student = (randn(5, 1537, seed=31) * 3).requires_grad_()
    teacher = randn(5, 1537, seed=32) * 3
    grad = randn(5, seed=33)
    loss = native_softmax_kl(student, teacher, 1.5)
    assert row_sized_saves(loss, student, teacher) == []
    assert loss.grad_fn.kept_gradient.shape == student.shape
    (kept,) = torch.autograd.grad(loss, student, grad, retain_graph=True)
    assert loss.grad_fn.kept_gradient is None  # scaled in place and handed on
    (again,) = torch.autograd.grad(loss, student, grad)  # the kernel rerun
    assert torch.equal(again, kept)
    _, row_stats = torch.ops.kdfast.softmax_kl_with_stats(student.detach(), teacher, 1.5,
                                                          "forward", 0.5)
    recomputed, _ = torch.ops.kdfast.softmax_kl_backward(grad, student.detach(), teacher,
                                                         row_stats, 1.5, "forward", 0.5, True,
                                                         False)
    torch.testing.assert_close(kept, recomputed, rtol=1e-13, atol=1e-17)
    with torch.no_grad():
        assert native_softmax_kl(student, teacher, 1.5).grad_fn is None
        assert not keeps_gradient(student, teacher, "forward")

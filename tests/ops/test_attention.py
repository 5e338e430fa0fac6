"""Native attention map: gradcheck, the automatic choice, refused dtypes, torch.compile.
Values and gradients over shapes, layouts, dtypes, degenerate inputs, determinism and random
shapes (CPU and CUDA) are in tests/test_parity.py."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.ops.attention import NativeAttentionLoss, native_attention_map
from kdfast.reference.attention import at_loss, attention_map
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")


def value_and_grad(fn, x, grad_map, p):
    out = fn(x, p)
    (grad,) = torch.autograd.grad(out, x, grad_map)
    return out, grad


def test_native_float64_gradcheck():
    x = randn(2, 3, 4, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: native_attention_map(t, 3.0), (x,))


def test_auto_picks_native_on_cpu():
    assert backends.choose("attention_map", "auto", randn(1, 2, 3, 3)).backend == "native"


def test_native_refuses_integer_dtype():
    reason = backends.native_supports(torch.zeros(1, 2, 3, 3, dtype=torch.int64))
    assert reason is not None and "dtype" in reason


def test_native_traces_under_torch_compile():
    x = randn(2, 3, 4, 5, requires_grad=True)
    grad_map = torch.randn(2, 20, dtype=torch.float64)
    compiled = torch.compile(native_attention_map, fullgraph=True, backend="aot_eager")
    out, grad = value_and_grad(compiled, x, grad_map, 2.0)
    ref, ref_grad = value_and_grad(attention_map, x, grad_map, 2.0)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


# --- the fused CPU loss: torch.ops.kdfast.attention_loss / attention_loss_backward ----------

def _fused_and_reference(student, teacher, p, mode, weights):
    """(values, gradients) of the fused loss and of the reference, on the same inputs."""
    results = []
    for fn in (lambda s, t: NativeAttentionLoss.apply(s, t, p, mode == "paper"),
               lambda s, t: at_loss(s, t, p, mode)):
        loss = fn(student, teacher)
        wanted = [x for x in (student, teacher) if x.requires_grad]
        results.append((loss, torch.autograd.grad(loss, wanted, weights)))
    return results


LOSS_CASES = [((2, 3, 5, 7), (2, 6, 5, 7)), ((1, 1, 1, 1), (1, 2, 1, 1)),
              ((3, 17, 13, 11), (3, 4, 13, 11)), ((2, 33, 40, 41), (2, 9, 40, 41))]


@pytest.mark.parametrize("shapes", LOSS_CASES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_fused_loss_matches_reference_float64(shapes, p, mode):
    student = randn(*shapes[0], seed=1, requires_grad=True)
    teacher = randn(*shapes[1], seed=2, requires_grad=True)
    weights = torch.rand(shapes[0][0], dtype=torch.float64) + 0.5
    (out, grads), (ref, ref_grads) = _fused_and_reference(student, teacher, p, mode, weights)
    assert_rel_close(out, ref, 1e-12, "value")
    for name, grad, ref_grad in zip(("student", "teacher"), grads, ref_grads, strict=True):
        assert_rel_close(grad, ref_grad, 1e-11, f"{name} gradient")


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_fused_loss_reads_layouts_in_place(layout):
    base = randn(3, 12, 6, 5, seed=3)
    student = {"channels_last": base.contiguous(memory_format=torch.channels_last),
               "sliced": base[:, ::2], "transposed": base.transpose(2, 3)}[layout]
    student = student.detach().requires_grad_()
    teacher = randn(*student.shape, seed=4)
    weights = torch.ones(3, dtype=torch.float64)
    (out, grads), (ref, ref_grads) = _fused_and_reference(student, teacher, 2.0, "code", weights)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grads[0], ref_grads[0], 1e-11, "gradient")


@pytest.mark.parametrize("hw", [(16, 16), (16, 17), (32, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
def test_fused_loss_float32_around_the_short_row_path(hw, sliced):
    """fp32 rows of 1 KiB (HW = 256) and below are summed one at a time, longer ones four at a
    time (csrc/cpu/attention.cpp): both sides of the switch, with channel strides of one row
    and of two, against the float64 reference."""
    base = randn(2, 14, *hw, seed=11)
    student = (base[:, ::2] if sliced else base[:, :7]).float().detach().requires_grad_()
    teacher = randn(2, 5, *hw, seed=12).float()
    out = NativeAttentionLoss.apply(student, teacher, 2.0, False)
    (grad,) = torch.autograd.grad(out.sum(), student)
    s64 = student.detach().double().requires_grad_()
    ref = at_loss(s64, teacher.double())
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    assert_rel_close(out.double(), ref, 1e-5, "value")
    assert_rel_close(grad.double(), ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_fused_loss_degenerate_samples(mode):
    """An all-zero sample (map 0, norm below eps) and a sample equal to the teacher's (loss 0:
    the paper norm's gradient is 0 there, as torch's)."""
    student = randn(3, 4, 5, 5, seed=5)
    teacher = randn(3, 4, 5, 5, seed=6)
    student[0] = 0
    teacher[1] = student[1]
    student.requires_grad_()
    weights = torch.ones(3, dtype=torch.float64)
    (out, grads), (ref, ref_grads) = _fused_and_reference(student, teacher, 2.0, mode, weights)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grads[0], ref_grads[0], 1e-11, "gradient")
    assert float(out[1].detach()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_loss_low_precision(dtype):
    student = randn(2, 9, 6, 7, seed=7).to(dtype).requires_grad_()
    teacher = randn(2, 5, 6, 7, seed=8).to(dtype)
    out = NativeAttentionLoss.apply(student, teacher, 2.0, False)
    (grad,) = torch.autograd.grad(out.sum(), student)
    s64 = student.detach().double().requires_grad_()
    ref = at_loss(s64, teacher.double())
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel_close(out.double(), ref, tol, "value")
    assert_rel_close(grad.double(), ref_grad, tol, "gradient")


def test_fused_loss_gradcheck_and_gradgradcheck():
    student = randn(2, 3, 4, 5, seed=9, requires_grad=True)
    teacher = randn(2, 2, 4, 5, seed=10, requires_grad=True)
    fn = lambda s, t: NativeAttentionLoss.apply(s, t, 3.0, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student, teacher))
    assert torch.autograd.gradgradcheck(fn, (student, teacher))


def test_fused_loss_traces_under_torch_compile():
    student = randn(2, 3, 4, 5, seed=11, requires_grad=True)
    teacher = randn(2, 6, 4, 5, seed=12)
    compiled = torch.compile(lambda s, t: NativeAttentionLoss.apply(s, t, 2.0, False).sum(),
                             fullgraph=True, backend="aot_eager")
    out = compiled(student, teacher)
    (grad,) = torch.autograd.grad(out, student)
    ref = at_loss(student, teacher).sum()
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


def test_fused_loss_names_a_shape_mismatch():
    with pytest.raises(RuntimeError, match="same B, H and W"):
        torch.ops.kdfast.attention_loss(randn(2, 3, 4, 4), randn(2, 3, 4, 5), 2.0, False)

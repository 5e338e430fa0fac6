"""Triton softmax-KL core against the reference: every divergence, both gradients, awkward
row lengths (the interpreter's block is 16 columns), masked and extreme logits, float16,
non-contiguous inputs and torch.compile. Tiny shapes: the interpreter is slow."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.ops.softmax_kl import CORE
from kdfast.reference.softmax_kl import softmax_kl
from tests.helpers import assert_rel_close, dtype_tolerance, randn

pytestmark = pytest.mark.triton_interpret

NEG_INF = float("-inf")
DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def triton_softmax_kl(s, t, *options):
    return backends.choose(CORE, "triton", s, t).fn(s, t, *options)


def run(fn, student, teacher, grad_output, *options):
    s = student.detach().requires_grad_(True)
    t = teacher.detach().requires_grad_(True)
    loss = fn(s, t, *options)
    return (loss, *torch.autograd.grad(loss, (s, t), grad_output))


def assert_matches_reference(student, teacher, *options, tol=1e-12):
    grad_output = torch.rand(student.shape[0], dtype=torch.float64,
                             device=student.device) + 0.5
    got = run(triton_softmax_kl, student, teacher, grad_output, *options)
    want = run(softmax_kl, student, teacher, grad_output, *options)
    for what, out, ref in zip(("value", "student gradient", "teacher gradient"), got, want,
                              strict=True):
        assert out.dtype == ref.dtype
        assert_rel_close(out, ref, tol, what)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 37)])
def test_matches_reference_float64(device, shape, divergence, beta):
    student, teacher = randn(*shape, seed=0).to(device) * 3, randn(*shape, seed=1).to(device) * 3
    assert_matches_reference(student, teacher, 1.7, divergence, beta)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_masked_and_extreme_logits(device, divergence, beta):
    student, teacher = randn(3, 21, seed=2) * 1e4, randn(3, 21, seed=3) * 1e4
    student[:, 0], teacher[:, 0] = 2e4, 2e4  # a shared peak: the KLs stay finite
    student[:, [4, 17]] = NEG_INF  # masked in both rows
    teacher[:, [4, 17]] = NEG_INF
    assert_matches_reference(student.to(device), teacher.to(device), 3.0, divergence, beta)
    s = student.to(device).requires_grad_(True)
    grad = torch.autograd.grad(triton_softmax_kl(s, teacher.to(device), 3.0, divergence,
                                                 beta).sum(), s)[0]
    assert torch.all(grad[:, [4, 17]] == 0)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["student", "teacher"])
def test_one_gradient_requested(device, needs, divergence, beta):
    student, teacher = randn(3, 23, seed=12).to(device), randn(3, 23, seed=13).to(device)
    grad_output = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    grads = []
    for fn in (triton_softmax_kl, softmax_kl):
        leaves = [x.detach().requires_grad_(need) for x, need in zip((student, teacher), needs,
                                                                     strict=True)]
        loss = fn(*leaves, 1.3, divergence, beta)
        wanted = [x for x in leaves if x.requires_grad]
        grads.append(torch.autograd.grad(loss, wanted, grad_output))
    assert_rel_close(grads[0][0], grads[1][0], 1e-12, "gradient")


def test_forward_keeps_nothing_of_row_size(device):
    """The recomputing form: the graph holds the inputs and six numbers per row, and the
    backward's gradients come in the inputs' dtype."""
    student = randn(4, 40, seed=14).to(device, torch.float16).requires_grad_(True)
    teacher = randn(4, 40, seed=15).to(device, torch.float16)
    loss = triton_softmax_kl(student, teacher, 2.0)
    saved = loss.grad_fn.saved_tensors
    assert [tuple(x.shape) for x in saved] == [(4, 40), (4, 40), (4, 6)]
    assert saved[0] is student and saved[1] is teacher and saved[2].dtype == torch.float32
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert grad.dtype == torch.float16


def test_non_finite_logits_give_nan(device):
    student, teacher = randn(3, 5, seed=4), randn(3, 5, seed=5)
    teacher[0, 1], teacher[1, 2] = float("nan"), float("inf")
    loss = triton_softmax_kl(student.to(device), teacher.to(device), 1.0)
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:3])
def test_float16_within_the_reference_rule(device, divergence, beta):
    s64, t64 = randn(3, 19, seed=6) * 2, randn(3, 19, seed=7) * 2
    s, t = s64.to(device, torch.float16), t64.to(device, torch.float16)
    exact = (s.double(), t.double())
    grad_output = torch.rand(3, device=device) + 0.5
    got = run(triton_softmax_kl, s, t, grad_output, 2.0, divergence, beta)
    want = run(softmax_kl, *exact, grad_output.double(), 2.0, divergence, beta)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16
    for i in range(3):
        tol = dtype_tolerance(
            lambda a, b, i=i: run(softmax_kl, a, b, grad_output.to(
                torch.float64 if a.dtype == torch.float64 else torch.float32), 2.0,
                divergence, beta)[i], exact, torch.float16)
        assert_rel_close(got[i], want[i], tol)


def test_non_contiguous_inputs(device):
    student = randn(9, 4, seed=8).to(device).t()
    teacher = randn(4, 27, seed=9).to(device)[:, ::3]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    assert_matches_reference(student, teacher, 2.0, "forward", 0.5)


def test_kd_loss_on_triton_and_compiled(device):
    student, teacher = randn(4, 10, seed=10).to(device), randn(4, 10, seed=11).to(device)
    s = student.requires_grad_(True)

    def loss(a, b):
        return kdfast.functional.kd_loss(a, b, temperature=2.0, backend="triton")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(s, teacher)
    ref = kdfast.functional.kd_loss(s, teacher, temperature=2.0, backend="reference")
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s)[0], 1e-12,
                     "gradient")


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_fused_linear_kd_chunk_kernel_is_the_core(divergence, beta):
    # The fused linear KD's per-chunk pass on Triton (stats forward, backward with
    # grad_output 1) gives the per-row loss and dL/ds of the reference.
    from kdfast.ops.fused_linear_kd import triton_loss_and_gradient
    student, teacher = randn(5, 37, seed=61) * 3, randn(5, 37, seed=62) * 3
    loss, grad, _ = triton_loss_and_gradient(student, teacher, 2.0, divergence, beta, True, False)
    s = student.detach().requires_grad_(True)
    want = softmax_kl(s, teacher, 2.0, divergence, beta)
    assert_rel_close(loss, want, 1e-12, "value")
    assert_rel_close(grad, torch.autograd.grad(want.sum(), s)[0], 1e-12, "student gradient")
    loss_only, empty, _ = triton_loss_and_gradient(student, teacher, 2.0, divergence, beta,
                                                   False, False)
    assert torch.equal(loss_only, loss) and empty.numel() == 0

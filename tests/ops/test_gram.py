"""Native batch-Gram cores ("similarity" for SP, "fsp" for FSP): gradcheck, float16 Grams
that would overflow, the automatic choice, torch.compile. Values and every gradient over
shapes, layouts, dtypes, degenerate inputs, determinism and random shapes (CPU and CUDA) are
in tests/test_parity.py."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.ops.gram import native_fsp_pair_loss, native_similarity_loss
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.sp import similarity_loss
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

CORES = {"sp": (native_similarity_loss, similarity_loss),
         "fsp": (native_fsp_pair_loss, fsp_pair_loss)}


def outputs(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. inputs needing them."""
    out = fn(*inputs)
    wanted = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype)) if wanted else ()
    return [out, *grads]


def sp_inputs(b, shape_s, shape_t, teacher_grad=True, dtype=torch.float64, seed=None):
    s = randn(b, *shape_s, dtype=dtype, seed=seed, requires_grad=True)
    t = randn(b, *shape_t, dtype=dtype, seed=None if seed is None else seed + 1,
              requires_grad=teacher_grad)
    return [s, t]


def fsp_inputs(b, ca, cb, hw_s, hw_t, teacher_grad=True, dtype=torch.float64):
    return [randn(b, ca, *hw_s, dtype=dtype, requires_grad=True),
            randn(b, cb, *hw_s, dtype=dtype, requires_grad=True),
            randn(b, ca, *hw_t, dtype=dtype, requires_grad=teacher_grad),
            randn(b, cb, *hw_t, dtype=dtype, requires_grad=teacher_grad)]


def test_gradcheck_float64():
    sp = sp_inputs(3, (2, 2, 2), (3, 2, 1))
    assert torch.autograd.gradcheck(native_similarity_loss, sp)
    fsp = fsp_inputs(2, 2, 3, (2, 2), (1, 3))
    assert torch.autograd.gradcheck(native_fsp_pair_loss, fsp)


def test_half_grams_do_not_overflow():
    s = torch.full((3, 64, 32, 32), 8.0, dtype=torch.float16) + torch.randn(3, 64, 32, 32,
                                                                            dtype=torch.float16)
    t = torch.randn(3, 16, 32, 32, dtype=torch.float16)
    assert_rel_close(native_similarity_loss(s, t), similarity_loss(s, t), 2e-2)
    assert_rel_close(native_fsp_pair_loss(s, s, t.repeat(1, 4, 1, 1), t.repeat(1, 4, 1, 1)),
                     fsp_pair_loss(s, s, t.repeat(1, 4, 1, 1), t.repeat(1, 4, 1, 1)), 2e-2)


@pytest.mark.parametrize("core", ["similarity", "fsp"])
def test_auto_picks_native_on_cpu(core):
    tensors = [randn(2, 3, 4, 4)] * (2 if core == "similarity" else 4)
    assert backends.choose(core, "auto", *tensors).backend == "native"


@pytest.mark.parametrize("core", ["sp", "fsp"])
def test_traces_under_torch_compile(core):
    inputs = sp_inputs(3, (2, 3, 3), (4, 3, 3)) if core == "sp" else \
        fsp_inputs(2, 2, 3, (3, 3), (2, 2))
    native, reference = CORES[core]
    compiled = torch.compile(native, fullgraph=True, backend="aot_eager")
    grad_out = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    for got, expected in zip(outputs(compiled, inputs, grad_out),
                             outputs(reference, inputs, grad_out), strict=True):
        assert_rel_close(got, expected, 1e-12)




@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fsp_backward_twice_with_retain_graph(teacher_grad):
    """The first backward scales the kept difference in place into the GEMM weight (for the
    teacher's side too when it needs a gradient); a second one (retain_graph) recomputes
    it: both equal the reference's gradients, bitwise equal to each other."""
    inputs = fsp_inputs(3, 4, 5, (3, 2), (2, 3), teacher_grad=teacher_grad)
    wanted = [x for x in inputs if x.requires_grad]
    grad_out = torch.randn(3, dtype=torch.float64)
    loss = native_fsp_pair_loss(*inputs)
    first = torch.autograd.grad(loss, wanted, grad_out, retain_graph=True)
    second = torch.autograd.grad(loss, wanted, grad_out)
    expected = outputs(fsp_pair_loss, inputs, grad_out)[1:]
    for a, b, ref in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        assert_rel_close(a, ref, 1e-12)

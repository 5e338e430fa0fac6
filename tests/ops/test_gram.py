"""Native batch-Gram cores ("similarity" for SP, "fsp" for FSP) against the references:
values and every gradient (teacher too, when it requires grad) in float64 and below, awkward
shapes and layouts, degenerate inputs, determinism and a property test over random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast import backends
from kdfast.ops.gram import native_fsp_pair_loss, native_similarity_loss
from kdfast.reference.fsp import fsp_pair_loss
from kdfast.reference.sp import similarity_loss
from tests.helpers import assert_rel_close, dtype_tolerance, randn

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


def assert_matches_reference(core, inputs, tol=1e-12, seed=0):
    native, reference = CORES[core]
    torch.manual_seed(seed)
    grad_out = torch.randn(inputs[0].shape[0], dtype=torch.float64, device=inputs[0].device)
    expected = outputs(reference, inputs, grad_out)
    got = outputs(native, inputs, grad_out)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape and g.dtype == e.dtype, f"output {i}: {g.dtype} {e.dtype}"
        assert_rel_close(g, e, tol, "value" if i == 0 else f"gradient {i}")
    return got


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


@pytest.mark.parametrize("b,shape_s,shape_t", [
    (1, (3, 2, 2), (5, 2, 2)), (2, (1, 1, 1), (1, 1, 1)), (5, (3, 5, 7), (6, 4, 3)),
    (7, (13,), (9,)), (4, (2, 3, 3, 2), (4, 3))])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_similarity_matches_reference_float64(b, shape_s, shape_t, teacher_grad):
    assert_matches_reference("sp", sp_inputs(b, shape_s, shape_t, teacher_grad))


@pytest.mark.parametrize("b,ca,cb,hw_s,hw_t", [
    (1, 1, 1, (1, 1), (1, 1)), (2, 3, 5, (5, 7), (5, 7)), (3, 7, 4, (4, 4), (2, 3)),
    (1, 9, 2, (1, 13), (3, 1))])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fsp_matches_reference_float64(b, ca, cb, hw_s, hw_t, teacher_grad):
    assert_matches_reference("fsp", fsp_inputs(b, ca, cb, hw_s, hw_t, teacher_grad))


def test_gradcheck_float64():
    sp = sp_inputs(3, (2, 2, 2), (3, 2, 1))
    assert torch.autograd.gradcheck(native_similarity_loss, sp)
    fsp = fsp_inputs(2, 2, 3, (2, 2), (1, 3))
    assert torch.autograd.gradcheck(native_fsp_pair_loss, fsp)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        y = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        y = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # a channel slice of a wider tensor
        wide = torch.cat([x, torch.randn_like(x)], dim=1)
        y = wide[:, : x.shape[1]]
    return y.detach().requires_grad_(x.requires_grad)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "channel_slice"])
def test_strided_inputs(layout):
    sp = [strided(x, layout) for x in sp_inputs(3, (4, 5, 3), (2, 3, 3))]
    assert not any(x.is_contiguous() for x in sp)
    grads = assert_matches_reference("sp", sp)
    fsp = [strided(x, layout) for x in fsp_inputs(3, 4, 5, (5, 3), (2, 3))]
    fsp_grads = assert_matches_reference("fsp", fsp)
    if layout == "channels_last":  # gradients keep the inputs' layout
        for x, g in zip(sp + fsp, grads[1:] + fsp_grads[1:], strict=True):
            assert g.stride() == x.stride()


def test_all_zero_channel_and_all_zero_sample():
    s, t = sp_inputs(4, (3, 4, 4), (5, 4, 4), teacher_grad=False)
    with torch.no_grad():
        s[0, 1] = 0
        s[2] = 0
        t[1, 0] = 0
    assert_matches_reference("sp", [s, t], tol=1e-10)
    fsp = fsp_inputs(3, 3, 4, (3, 3), (3, 3))
    with torch.no_grad():
        fsp[0][0, 1] = 0
        fsp[1][1] = 0
        fsp[3][2] = 0
    assert_matches_reference("fsp", fsp)


@pytest.mark.parametrize("core", ["sp", "fsp"])
def test_float32(core):
    inputs64 = sp_inputs(6, (9, 5, 5), (13, 5, 5)) if core == "sp" else \
        fsp_inputs(3, 9, 13, (6, 5), (6, 5))
    native, reference = CORES[core]
    grad_out = torch.randn(inputs64[0].shape[0], dtype=torch.float64)
    expected = outputs(reference, inputs64, grad_out)
    got = outputs(native, [x.detach().float().requires_grad_(True) for x in inputs64], grad_out)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == torch.float32
        assert_rel_close(g, e, 1e-5, f"output {i}")


@pytest.mark.parametrize("core", ["sp", "fsp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(core, dtype):
    inputs64 = sp_inputs(6, (9, 5, 5), (13, 5, 5)) if core == "sp" else \
        fsp_inputs(3, 9, 13, (6, 5), (6, 5))
    native, reference = CORES[core]
    grad_out = torch.randn(inputs64[0].shape[0], dtype=torch.float64)
    expected = outputs(reference, inputs64, grad_out)
    got = outputs(native, [x.detach().to(dtype).requires_grad_(True) for x in inputs64],
                  grad_out)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.dtype == (torch.float32 if i == 0 else dtype)

        def reference_output(*xs, i=i):
            xs = [x.detach().requires_grad_(True) for x in xs]
            return outputs(reference, xs, grad_out)[i]

        assert_rel_close(g, e, dtype_tolerance(reference_output, inputs64, dtype), f"output {i}")


def test_half_grams_do_not_overflow():
    s = torch.full((3, 64, 32, 32), 8.0, dtype=torch.float16) + torch.randn(3, 64, 32, 32,
                                                                            dtype=torch.float16)
    t = torch.randn(3, 16, 32, 32, dtype=torch.float16)
    assert_rel_close(native_similarity_loss(s, t), similarity_loss(s, t), 2e-2)
    assert_rel_close(native_fsp_pair_loss(s, s, t.repeat(1, 4, 1, 1), t.repeat(1, 4, 1, 1)),
                     fsp_pair_loss(s, s, t.repeat(1, 4, 1, 1), t.repeat(1, 4, 1, 1)), 2e-2)


@pytest.mark.parametrize("core", ["sp", "fsp"])
def test_deterministic(core):
    inputs = sp_inputs(8, (16, 6, 6), (8, 6, 6), dtype=torch.float32) if core == "sp" else \
        fsp_inputs(4, 16, 8, (6, 6), (6, 6), dtype=torch.float32)
    grad_out = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    first = outputs(CORES[core][0], inputs, grad_out)
    second = outputs(CORES[core][0], inputs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


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


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), ca=st.integers(1, 6), cb=st.integers(1, 6), h=st.integers(1, 6),
       w=st.integers(1, 6), channels_last=st.booleans(), teacher_grad=st.booleans())
def test_matches_reference_on_random_shapes(b, ca, cb, h, w, channels_last, teacher_grad):
    layout = (lambda x: strided(x, "channels_last")) if channels_last else (lambda x: x)
    sp = [layout(x) for x in sp_inputs(b, (ca, h, w), (cb, w, h), teacher_grad)]
    assert_matches_reference("sp", sp, tol=1e-10)
    fsp = [layout(x) for x in fsp_inputs(b, ca, cb, (h, w), (w, h), teacher_grad)]
    assert_matches_reference("fsp", fsp, tol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not kdfast.available_backends()["native_cuda"],
                    reason="needs a CUDA device and the extension built with CUDA")
@pytest.mark.parametrize("core", ["sp", "fsp"])
def test_cuda_matches_reference_float64(core):
    inputs = sp_inputs(5, (3, 5, 7), (6, 4, 3)) if core == "sp" else \
        fsp_inputs(3, 7, 4, (4, 4), (2, 3))
    assert_matches_reference(core, [x.detach().cuda().requires_grad_(True) for x in inputs])

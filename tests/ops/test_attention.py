"""Native attention map against the reference: values and gradients in float64 and below,
awkward layouts, degenerate inputs, determinism and a property test over random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from kdfast import backends
from kdfast.ops.attention import native_attention_map
from kdfast.reference.attention import attention_map
from tests.helpers import assert_rel_close, dtype_tolerance, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

SHAPES = [(1, 1, 1, 1), (1, 3, 1, 5), (2, 3, 5, 7), (3, 17, 13, 11), (2, 4, 40, 41)]


def value_and_grad(fn, x, grad_map, p):
    out = fn(x, p)
    (grad,) = torch.autograd.grad(out, x, grad_map)
    return out, grad


def assert_matches_reference(x, p=2.0, tol=1e-12, seed=0):
    """Native vs reference on x: the map and d x for a random (not all-ones) grad_map."""
    torch.manual_seed(seed)
    grad_map = torch.randn(x.shape[0], x.shape[2] * x.shape[3], dtype=x.dtype)
    ref, ref_grad = value_and_grad(attention_map, x, grad_map, p)
    out, grad = value_and_grad(native_attention_map, x, grad_map, p)
    assert_rel_close(out, ref, tol, "value")
    # A map of one position has a zero gradient: compare absolutely, not relatively.
    if x.shape[2] * x.shape[3] == 1:
        assert grad.abs().max() <= 1e-12 and ref_grad.abs().max() <= 1e-12
    else:
        assert_rel_close(grad, ref_grad, tol, "gradient")
    return grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_native_matches_reference_float64(shape, p):
    assert_matches_reference(randn(*shape, requires_grad=True), p)


def test_native_float64_gradcheck():
    x = randn(2, 3, 4, 5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: native_attention_map(t, 3.0), (x,))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "channel_slice",
                                    "batch_slice", "expanded"])
def test_native_strided_inputs_values_and_gradients(layout):
    if layout == "channels_last":
        x = randn(3, 6, 5, 7).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = randn(3, 6, 7, 5).transpose(2, 3)
    elif layout == "channel_slice":
        x = randn(3, 11, 5, 7)[:, 1::2]
    elif layout == "batch_slice":
        x = randn(6, 5, 5, 7)[::2]
    else:
        x = randn(3, 1, 5, 7).expand(3, 4, 5, 7)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    grad = assert_matches_reference(x, 2.0)
    if layout == "channels_last":  # the gradient keeps the input's layout (no copy)
        assert grad.stride() == x.stride()


def test_native_all_zero_channel_and_all_zero_sample():
    x = randn(3, 3, 4, 4)
    x[0, 1] = 0
    x[1] = 0
    x.requires_grad_(True)
    for p in (1.0, 2.0, 3.0):
        grad = assert_matches_reference(x, p)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_native_float32(channels_last):
    x64 = randn(4, 33, 9, 11)
    x = x64.float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    x64.requires_grad_(True)
    grad_map = torch.randn(4, 99, dtype=torch.float64)
    ref, ref_grad = value_and_grad(attention_map, x64, grad_map, 2.0)
    out, grad = value_and_grad(native_attention_map, x, grad_map.float(), 2.0)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert_rel_close(out, ref, 1e-5, "value")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_low_precision_within_twice_torch_error(dtype):
    x64 = randn(2, 9, 6, 7)
    grad_map = torch.randn(2, 42, dtype=torch.float64)

    def ref_grad(x):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(attention_map(x), x, grad_map.to(x.dtype))
        return grad

    ref, exact_grad = attention_map(x64), ref_grad(x64)
    x = x64.to(dtype).requires_grad_(True)
    out = native_attention_map(x)
    (grad,) = torch.autograd.grad(out, x, grad_map.float())
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_rel_close(out, ref, dtype_tolerance(attention_map, (x64,), dtype), "value")
    assert_rel_close(grad, exact_grad, dtype_tolerance(ref_grad, (x64,), dtype), "gradient")


def test_native_is_deterministic():
    x = randn(4, 33, 20, 20, dtype=torch.float32, requires_grad=True)
    grad_map = torch.randn(4, 400)
    first = value_and_grad(native_attention_map, x, grad_map, 2.0)
    second = value_and_grad(native_attention_map, x, grad_map, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_auto_picks_native_on_cpu():
    assert backends.choose("attention_map", "auto", randn(1, 2, 3, 3)).backend == "native"


def test_native_refuses_integer_dtype():
    reason = backends.native_supports(torch.zeros(1, 2, 3, 3, dtype=torch.int64))
    assert reason is not None and "dtype" in reason


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 9), w=st.integers(1, 9),
       p=st.sampled_from([1.0, 2.0, 2.5]), channels_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_native_matches_reference_on_random_shapes(b, c, h, w, p, channels_last, seed):
    x = randn(b, c, h, w, seed=seed)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert_matches_reference(x.requires_grad_(True), p, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not kdfast.available_backends()["native_cuda"],
                    reason="needs a CUDA device and the extension built with CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_cuda_matches_reference(dtype, channels_last):
    x64 = randn(3, 17, 13, 11)
    grad_map = torch.randn(3, 143, dtype=torch.float64)
    ref, ref_grad = value_and_grad(attention_map, x64.clone().requires_grad_(True), grad_map, 2.0)
    x = x64.to("cuda", dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out, grad = value_and_grad(native_attention_map, x, grad_map.to("cuda", out_dtype(dtype)), 2.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel_close(out.cpu(), ref, tol, "value")
    assert_rel_close(grad.cpu(), ref_grad, tol, "gradient")


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_native_traces_under_torch_compile():
    x = randn(2, 3, 4, 5, requires_grad=True)
    grad_map = torch.randn(2, 20, dtype=torch.float64)
    compiled = torch.compile(native_attention_map, fullgraph=True, backend="aot_eager")
    out, grad = value_and_grad(compiled, x, grad_map, 2.0)
    ref, ref_grad = value_and_grad(attention_map, x, grad_map, 2.0)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")

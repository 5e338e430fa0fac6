"""Native attention map against the reference: values and gradients in float64 and below."""

import pytest
import torch

import kdfast
from kdfast.ops.attention import native_attention_map
from kdfast.reference.attention import attention_map
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 13, 11), (2, 4, 40, 41)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_native_matches_reference_float64(shape, p):
    x = randn(*shape, requires_grad=True)
    grad_out = torch.randn(shape[0], shape[2] * shape[3], dtype=torch.float64)
    ref = attention_map(x, p)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    out = native_attention_map(x, p)
    (out_grad,) = torch.autograd.grad(out, x, grad_out)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(out_grad, ref_grad, 1e-12, "gradient")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_native_non_contiguous_inputs(layout):
    base = randn(2, 6, 5, 7)
    x = base.to(memory_format=torch.channels_last) if layout == "channels_last" else \
        randn(2, 6, 7, 5).transpose(2, 3)
    assert not x.is_contiguous()
    assert_rel_close(native_attention_map(x), attention_map(x), 1e-12)


def test_native_all_zero_channel_and_all_zero_sample():
    x = randn(2, 3, 4, 4, requires_grad=False)
    x[0, 1] = 0
    x[1] = 0
    x.requires_grad_(True)
    out = native_attention_map(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref = attention_map(x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_rel_close(out, ref, 1e-12)
    assert_rel_close(grad, ref_grad, 1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-3)])
def test_native_low_precision(dtype, tol):
    x64 = randn(2, 9, 6, 7)
    ref = attention_map(x64)
    x = x64.to(dtype).requires_grad_(True)
    out = native_attention_map(x)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, tol)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == dtype


def test_native_is_deterministic():
    x = randn(4, 33, 20, 20, dtype=torch.float32)
    assert torch.equal(native_attention_map(x), native_attention_map(x))

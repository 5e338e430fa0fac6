"""Triton attention map against the reference: values and gradients, awkward shapes/layouts."""

import pytest
import torch

from kdfast import backends
from kdfast.functional import at_loss
from kdfast.reference.attention import attention_map
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.triton_interpret


def triton_map(x, p=2.0):
    return backends.choose("attention_map", "triton", x).fn(x, p)


def value_and_grad(fn, x, grad_out):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out, grad


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 13, 11), (3, 9, 12, 3)])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_matches_reference_float64(device, shape, p):
    x = randn(*shape).to(device)
    grad_out = torch.randn(shape[0], shape[2] * shape[3], dtype=torch.float64, device=device)
    out, grad = value_and_grad(lambda t: triton_map(t, p), x, grad_out)
    ref, ref_grad = value_and_grad(lambda t: attention_map(t, p), x, grad_out)
    assert out.dtype == torch.float64
    assert_rel_close(out, ref, 1e-12, "value")
    if shape[2] * shape[3] == 1:  # q_hat is constant 1: both gradients are 0 up to rounding
        assert grad.abs().max() < 1e-12 and ref_grad.abs().max() < 1e-12
    else:
        assert_rel_close(grad, ref_grad, 1e-12, "gradient")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_strided_inputs_without_copies(device, layout):
    if layout == "channels_last":
        x = randn(2, 6, 5, 7).to(device, memory_format=torch.channels_last)
    elif layout == "transposed":
        x = randn(2, 6, 7, 5).to(device).transpose(2, 3)
    else:
        x = randn(2, 12, 5, 9).to(device)[:, ::2, :, 1:8]
    assert not x.is_contiguous()
    grad_out = torch.randn(2, 35, dtype=torch.float64, device=device)
    out, grad = value_and_grad(triton_map, x, grad_out)
    ref, ref_grad = value_and_grad(attention_map, x, grad_out)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


def test_all_zero_channel_and_sample_follow_eps(device):
    x = randn(2, 3, 4, 5).to(device)
    x[0, 1] = 0
    x[1] = 0
    grad_out = torch.randn(2, 20, dtype=torch.float64, device=device)
    out, grad = value_and_grad(triton_map, x, grad_out)
    ref, ref_grad = value_and_grad(attention_map, x, grad_out)
    assert torch.isfinite(grad).all()
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


def test_low_precision_accumulates_in_float32(device, low_precision):
    dtype, tol = low_precision
    x64 = randn(2, 9, 6, 7).to(device)
    grad_out = torch.randn(2, 42, dtype=torch.float64, device=device)
    ref, ref_grad = value_and_grad(attention_map, x64, grad_out)
    out, grad = value_and_grad(triton_map, x64.to(dtype), grad_out.float())
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_rel_close(out, ref, tol, "value")
    assert_rel_close(grad, ref_grad, 10 * tol, "gradient")


def test_at_loss_with_triton_backend(device):
    s, t = randn(2, 3, 8, 8).to(device), randn(2, 5, 4, 4).to(device)
    s.requires_grad_(True)
    out = at_loss(s, t, backend="triton", mode="paper")
    (grad,) = torch.autograd.grad(out * 3.0, s)
    ref = at_loss(s, t, backend="reference", mode="paper")
    (ref_grad,) = torch.autograd.grad(ref * 3.0, s)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


def test_deterministic(device):
    x = randn(3, 7, 11, 13, dtype=torch.float32).to(device)
    assert torch.equal(triton_map(x), triton_map(x))


def test_supports_names_the_reason(device):
    if device == "cpu":
        x = randn(1, 2, 3, 3, dtype=torch.float32).bfloat16()
        assert "bfloat16" in backends.implementations("attention_map")["triton"].supports(x)
    x = torch.ones(1, 2, 3, 3, dtype=torch.int64, device=device)
    assert "not supported" in backends.implementations("attention_map")["triton"].supports(x)

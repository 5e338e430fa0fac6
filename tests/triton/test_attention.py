"""Triton attention map: strided views read without copies, at_loss on the Triton backend,
``supports``. Values and gradients over the shapes, layouts, dtypes and determinism of the
core are in tests/test_parity.py."""

import pytest
import torch

from kdfast import backends
from kdfast.functional import at_loss
from kdfast.reference.attention import attention_map
from tests.helpers import assert_matches_reference, assert_rel_close, randn

pytestmark = pytest.mark.triton_interpret


def triton_map(x, p=2.0):
    return backends.choose("attention_map", "triton", x).fn(x, p)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_strided_inputs_without_copies(device, layout):
    if layout == "channels_last":
        x = randn(2, 6, 5, 7).to(device, memory_format=torch.channels_last)
    elif layout == "transposed":
        x = randn(2, 6, 7, 5).to(device).transpose(2, 3)
    else:  # channels and columns sliced
        x = randn(2, 12, 5, 9).to(device)[:, ::2, :, 1:8]
    assert not x.is_contiguous()
    assert_matches_reference(triton_map, attention_map, [x.requires_grad_()], rtol64=1e-12,
                             keep_channels_last=True)


def test_at_loss_with_triton_backend(device):
    s, t = randn(2, 3, 8, 8).to(device), randn(2, 5, 4, 4).to(device)
    s.requires_grad_(True)
    out = at_loss(s, t, backend="triton", mode="paper")
    (grad,) = torch.autograd.grad(out * 3.0, s)
    ref = at_loss(s, t, backend="reference", mode="paper")
    (ref_grad,) = torch.autograd.grad(ref * 3.0, s)
    assert_rel_close(out, ref, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


def test_supports_names_the_reason(device):
    if device == "cpu":
        x = randn(1, 2, 3, 3, dtype=torch.float32).bfloat16()
        assert "bfloat16" in backends.implementations("attention_map")["triton"].supports(x)
    x = torch.ones(1, 2, 3, 3, dtype=torch.int64, device=device)
    assert "not supported" in backends.implementations("attention_map")["triton"].supports(x)

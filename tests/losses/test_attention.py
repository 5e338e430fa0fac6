import pytest
import torch

import kdfast
from kdfast.functional import at_loss
from tests.helpers import REDUCTIONS, assert_rel_close, randn, spy_on_backend

# The fused backends that run on CPU tensors here (the reference is what they are checked
# against, so it is not among them).
FUSED = [pytest.param("native", marks=pytest.mark.skipif(
    not kdfast.available_backends()["native"], reason="native extension not built"))]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_at_loss_backends_agree(monkeypatch, backend, mode, reduction):
    s = randn(3, 5, 8, 6, seed=0, requires_grad=True)
    t = randn(3, 7, 4, 3, seed=1)  # student map is pooled 2x to the teacher's
    out = at_loss(s, t, mode=mode, reduction=reduction, backend=backend)
    ref = at_loss(s, t, mode=mode, reduction=reduction, backend="reference")
    assert_rel_close(out, ref, 1e-12)
    g_out = torch.autograd.grad(out.sum() * 1.7, s)[0]
    g_ref = torch.autograd.grad(ref.sum() * 1.7, s)[0]
    assert_rel_close(g_out, g_ref, 1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_native_cpu_at_loss_is_one_fused_function(monkeypatch, backend):
    """Native on the CPU runs both maps and the loss in one Function (not the maps' Functions
    and the torch epilogue)."""
    s, t = randn(3, 5, 4, 4, seed=0, requires_grad=True), randn(3, 7, 4, 4, seed=1)
    calls = spy_on_backend(monkeypatch, "attention_map", backend)
    out = at_loss(s, t, reduction="none", backend=backend)
    assert out.grad_fn.name() == "NativeAttentionLossBackward" and not calls


def test_at_loss_default_is_mean_over_batch_and_space():
    s, t = randn(2, 3, 4, 4, seed=3), randn(2, 3, 4, 4, seed=4)
    from kdfast.reference.attention import attention_map

    expected = (attention_map(s) - attention_map(t)).pow(2).mean()
    torch.testing.assert_close(at_loss(s, t), expected)



import pytest
import torch

import kdfast
from kdfast.functional import at_loss
from tests.helpers import assert_rel_close, randn

BACKENDS = ["reference"] + (["native"] if kdfast.available_backends()["native"] else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_at_loss_backends_agree(backend, mode, reduction):
    s = randn(3, 5, 8, 6, seed=0, requires_grad=True)
    t = randn(3, 7, 4, 3, seed=1)  # student map is pooled 2x to the teacher's
    out = at_loss(s, t, mode=mode, reduction=reduction, backend=backend)
    ref = at_loss(s, t, mode=mode, reduction=reduction, backend="reference")
    assert_rel_close(out, ref, 1e-12)
    g_out = torch.autograd.grad(out.sum() * 1.7, s)[0]
    g_ref = torch.autograd.grad(ref.sum() * 1.7, s)[0]
    assert_rel_close(g_out, g_ref, 1e-12)


def test_at_loss_default_is_mean_over_batch_and_space():
    s, t = randn(2, 3, 4, 4, seed=3), randn(2, 3, 4, 4, seed=4)
    from kdfast.reference.attention import attention_map

    expected = (attention_map(s) - attention_map(t)).pow(2).mean()
    torch.testing.assert_close(at_loss(s, t), expected)


def test_module_matches_function_and_repr():
    s, t = randn(2, 3, 4, 4), randn(2, 3, 4, 4)
    module = kdfast.ATLoss(p=3.0, mode="paper", backend="reference")
    torch.testing.assert_close(module(s, t), at_loss(s, t, p=3.0, mode="paper"))
    assert "mode='paper'" in repr(module)


@pytest.mark.parametrize("kwargs,match", [
    ({"p": 0.5}, "p must be >= 1"),
    ({"mode": "fancy"}, "mode must be one of"),
    ({"reduction": "avg"}, "reduction must be one of"),
])
def test_module_rejects_bad_options_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kdfast.ATLoss(**kwargs)


def test_bad_inputs():
    s = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="student must be 4-D"):
        at_loss(s[0], s)
    with pytest.raises(ValueError, match="same batch size"):
        at_loss(s, randn(3, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        at_loss(s, torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        at_loss(s, randn(2, 0, 4, 4))
    with pytest.raises(ValueError, match="pool=False"):
        at_loss(s, randn(2, 3, 2, 2), pool=False)
    with pytest.raises(ValueError, match="cannot be matched"):
        at_loss(s, randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        at_loss(s, s, backend="cuda")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        at_loss(s.numpy(), s)

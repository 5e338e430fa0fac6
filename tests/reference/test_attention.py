import pytest
import torch

from kdfast.reference.attention import at_loss, attention_map
from tests.helpers import randn


def test_attention_map_hand_computed():
    # One sample, two channels, 1x2 map: Q = mean_C |f|^2 = [(1+9)/2, (4+0)/2] = [5, 2].
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]], dtype=torch.float64)
    expected = torch.tensor([[5.0, 2.0]], dtype=torch.float64) / (29.0**0.5)
    torch.testing.assert_close(attention_map(f, 2.0), expected)


def test_attention_map_p1_uses_absolute_values():
    f = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.0]]]], dtype=torch.float64)
    q = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(attention_map(f, 1.0), q / q.norm())


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_identical_maps_give_zero_loss(mode):
    f = randn(3, 4, 5, 5)
    assert torch.all(at_loss(f, f.clone(), 2.0, mode) == 0)


def test_code_mode_is_mean_over_hw_and_paper_mode_is_norm():
    s, t = randn(2, 3, 4, 5, seed=0), randn(2, 6, 4, 5, seed=1)
    diff = attention_map(s) - attention_map(t)
    torch.testing.assert_close(at_loss(s, t, 2.0, "code"), diff.pow(2).sum(1) / 20)
    torch.testing.assert_close(at_loss(s, t, 2.0, "paper"), diff.pow(2).sum(1).sqrt())


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_gradcheck(p, mode):
    s = randn(2, 3, 3, 4, seed=2, requires_grad=True)
    t = randn(2, 5, 3, 4, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: at_loss(a, b, p, mode), (s, t))

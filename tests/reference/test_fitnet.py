import torch
import torch.nn.functional as F

from kdfast.reference.fitnet import hint_loss
from tests.helpers import randn


def test_hand_computed():
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    t = torch.tensor([[[[0.0, 2.0]], [[2.0, 1.0]]]], dtype=torch.float64)
    # squared differences 1, 0, 4, 4 -> mean 9/4
    torch.testing.assert_close(hint_loss(s, t), torch.tensor([2.25], dtype=torch.float64))


def test_batch_mean_is_global_mse():
    s, t = randn(3, 4, 5, 2, seed=0), randn(3, 4, 5, 2, seed=1)
    per_sample = hint_loss(s, t)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), F.mse_loss(s, t))
    torch.testing.assert_close(per_sample[1], F.mse_loss(s[1], t[1]))


def test_identical_inputs_give_zero():
    s = randn(2, 3, 4, 4)
    assert torch.all(hint_loss(s, s.clone()) == 0)


def test_gradcheck():
    s = randn(2, 3, 2, 3, seed=2, requires_grad=True)
    t = randn(2, 3, 2, 3, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(hint_loss, (s, t))

import math

import pytest
import torch

from kdfast.reference.cwd import channel_rows, cwd_loss
from tests.helpers import randn


def test_hand_computed():
    # One sample, two channels of 1 x 2 positions. Channel 0: teacher (log 3, 0) -> p_t =
    # (3/4, 1/4), student (0, 0) -> p_s = (1/2, 1/2); channel 1: equal maps, KL 0.
    s = torch.tensor([[[[0.0, 0.0]], [[1.0, 2.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[math.log(3.0), 0.0]], [[1.0, 2.0]]]], dtype=torch.float64)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(cwd_loss(s, t), torch.tensor([kl / 2], dtype=torch.float64))
    torch.testing.assert_close(cwd_loss(s, t, loss_weight=3.0),
                               torch.tensor([3 * kl / 2], dtype=torch.float64))


def test_temperature_divides_the_logits_and_multiplies_by_its_square():
    s, t = randn(2, 3, 4, 5, seed=0), randn(2, 3, 4, 5, seed=1)
    torch.testing.assert_close(cwd_loss(s, t, temperature=4.0), 16 * cwd_loss(s / 4, t / 4))


def test_identities():
    s, t = randn(2, 3, 4, 5, seed=2), randn(2, 3, 4, 5, seed=3)
    zeros = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(cwd_loss(t, t), zeros)
    # A constant per (sample, channel) does not change a softmax over positions.
    shift = randn(2, 3, 1, 1, seed=4)
    torch.testing.assert_close(cwd_loss(s + shift, t - shift), cwd_loss(s, t))
    assert (cwd_loss(s, t) > 0).all()


def test_is_the_channel_mean_of_per_channel_kl():
    s, t = randn(2, 3, 4, 5, seed=5), randn(2, 3, 4, 5, seed=6)
    per_channel = torch.stack([
        torch.stack([torch.nn.functional.kl_div(
            s[b, c].flatten().log_softmax(0), t[b, c].flatten().log_softmax(0),
            reduction="sum", log_target=True) for c in range(3)]) for b in range(2)])
    torch.testing.assert_close(cwd_loss(s, t), per_channel.mean(dim=1))


def mmrazor_channel_wise_divergence(preds_s, preds_t, tau=1.0, loss_weight=1.0):
    """An independent transcription of mmrazor's ChannelWiseDivergence.forward (its published
    formula: τ² Σ (p_t log p_t − p_t log p_s) / (C N) over (N·C, H·W) rows)."""
    n, c = preds_s.shape[:2]
    rows_s, rows_t = preds_s.reshape(n * c, -1) / tau, preds_t.reshape(n * c, -1) / tau
    p_t = rows_t.softmax(dim=1)
    total = torch.sum(p_t * rows_t.log_softmax(dim=1) - p_t * rows_s.log_softmax(dim=1))
    return loss_weight * total * tau**2 / (c * n)


@pytest.mark.parametrize("tau,loss_weight", [(1.0, 1.0), (4.0, 3.0)])
def test_batch_mean_is_mmrazors_channel_wise_divergence(tau, loss_weight):
    s, t = randn(3, 19, 6, 8, seed=7), randn(3, 19, 6, 8, seed=8)
    torch.testing.assert_close(cwd_loss(s, t, tau, loss_weight).mean(),
                               mmrazor_channel_wise_divergence(s, t, tau, loss_weight))


def test_channel_rows_is_a_view_of_contiguous_maps():
    x = randn(2, 3, 4, 5, seed=9)
    assert channel_rows(x).data_ptr() == x.data_ptr() and channel_rows(x).shape == (6, 20)


def test_gradcheck():
    s = randn(2, 3, 2, 3, seed=10, requires_grad=True)
    t = randn(2, 3, 2, 3, seed=11, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cwd_loss(a, b, 2.0), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: cwd_loss(a, b, 2.0), (s, t))

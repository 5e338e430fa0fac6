import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.vid import scale_for_variance, variance_from_scale, vid_loss
from tests.helpers import assert_rel_close, randn


def test_by_hand():
    t = randn(2, 2, 3, 3, seed=0)
    variance = torch.tensor([1.0, math.e**2], dtype=torch.float64)
    # mu = t: only 0.5 log sigma^2, averaged over the channels: (0 + 1) / 2
    torch.testing.assert_close(vid_loss(t, t, variance), torch.full((2,), 0.5,
                                                                    dtype=torch.float64))
    # mu - t = 2, sigma^2 = 4: 0.5 (4 / 4 + log 4)
    four = torch.full((2,), 4.0, dtype=torch.float64)
    torch.testing.assert_close(vid_loss(t + 2, t, four),
                               torch.full((2,), 0.5 + math.log(2), dtype=torch.float64))


def test_variance_parametrisation_is_repdistillers():
    alpha = scale_for_variance(5.0)
    assert alpha == pytest.approx(math.log(math.exp(5.0 - 1e-5) - 1.0))
    value = variance_from_scale(torch.tensor([alpha], dtype=torch.float64))
    torch.testing.assert_close(value, torch.tensor([5.0], dtype=torch.float64))
    x = randn(7, seed=1)
    torch.testing.assert_close(variance_from_scale(x), torch.log(1 + torch.exp(x)) + 1e-5)


def test_two_dimensional_inputs():
    mu, t = randn(3, 4, seed=2), randn(3, 4, seed=3)
    var = torch.rand(4, dtype=torch.float64) + 0.5
    expected = (0.5 * ((mu - t) ** 2 / var + var.log())).mean(dim=1)
    torch.testing.assert_close(vid_loss(mu, t, var), expected)


def test_gradcheck_and_gradgradcheck():
    mu, t = randn(2, 3, 2, 2, seed=4, requires_grad=True), randn(2, 3, 2, 2, seed=5)
    alpha = randn(3, seed=6, requires_grad=True)

    def loss(m, a):
        return vid_loss(m, t, variance_from_scale(a))

    assert torch.autograd.gradcheck(loss, (mu, alpha))
    assert torch.autograd.gradgradcheck(loss, (mu, alpha))


def test_equals_torchdistill_vid():
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill (peer library) not installed")
    mu, t = randn(3, 4, 5, 5, seed=7), randn(3, 4, 5, 5, seed=8)
    var = F.softplus(randn(4, seed=9)) + 1e-5
    pairs = {"p": {"student": {"path": "reg", "io": "output"},
                   "teacher": {"path": "layer", "io": "output"}}}
    peer = mid_level.VIDLoss(pairs)
    expected = peer({"reg": {"output": (mu, var.view(1, -1, 1, 1))}},
                    {"layer": {"output": t}})
    assert_rel_close(vid_loss(mu, t, var).mean(), expected, 1e-13)

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.pkd import pkd_loss, standardise_channels
from tests.helpers import randn


def test_hand_computed():
    # One channel, N·H·W = 2 values per map. x = (0, 2): mean 1, unbiased std √2, so
    # standardised (−1/√2, 1/√2) (ignoring the 1e-6).
    s = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[5.0, 1.0]]]], dtype=torch.float64)  # -> (1/√2, −1/√2)
    # (ŝ − t̂)² = (√2)² = 2 per position, mean 2, halved: 1 (the correlation is −1).
    torch.testing.assert_close(pkd_loss(s, t), torch.tensor([1.0], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(pkd_loss(s, 2 * s + 3), torch.zeros(1, dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_standardised_channels_have_zero_mean_and_unit_std():
    x = randn(3, 4, 5, 6, seed=0) * 7 + 2
    z = standardise_channels(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_is_about_one_minus_the_pearson_correlation_per_channel():
    s, t = randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2)
    rows_s = s.transpose(0, 1).reshape(3, -1)
    rows_t = t.transpose(0, 1).reshape(3, -1)
    r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1]
                     for a, b in zip(rows_s, rows_t, strict=True)])
    n = rows_s.shape[1]
    torch.testing.assert_close(pkd_loss(s, t).mean(), ((n - 1) / n * (1 - r)).mean(),
                               rtol=1e-5, atol=0)


def test_invariant_to_a_positive_affine_map_per_channel():
    s, t = randn(2, 3, 4, 5, seed=3), randn(2, 3, 4, 5, seed=4)
    scale, shift = randn(1, 3, 1, 1, seed=5).abs() + 0.5, randn(1, 3, 1, 1, seed=6)
    torch.testing.assert_close(pkd_loss(s * scale + shift, t), pkd_loss(s, t), rtol=1e-5, atol=0)


def mmrazor_pkd(preds_s, preds_t, loss_weight=1.0):
    """An independent transcription of mmrazor's PKDLoss.forward on one pair of equal sizes
    (its published formula: per channel over (N, H, W), (x − mean) / (std + 1e-6), then
    F.mse_loss / 2 · loss_weight)."""
    def norm(x):
        n, c, h, w = x.shape
        rows = x.transpose(0, 1).reshape(c, -1)
        rows = (rows - rows.mean(-1, keepdim=True)) / (rows.std(-1, keepdim=True) + 1e-6)
        return rows.reshape(c, n, h, w).transpose(0, 1)
    return F.mse_loss(norm(preds_s), norm(preds_t)) / 2 * loss_weight


@pytest.mark.parametrize("loss_weight", [1.0, 6.0])
def test_batch_mean_is_mmrazors_pkd_loss(loss_weight):
    s, t = randn(3, 8, 5, 7, seed=7), randn(3, 8, 5, 7, seed=8)
    torch.testing.assert_close(pkd_loss(s, t, loss_weight).mean(), mmrazor_pkd(s, t, loss_weight))


def test_gradcheck():
    s = randn(2, 2, 3, 2, seed=9, requires_grad=True)
    t = randn(2, 2, 3, 2, seed=10, requires_grad=True)
    assert torch.autograd.gradcheck(pkd_loss, (s, t))
    assert torch.autograd.gradgradcheck(pkd_loss, (s, t))

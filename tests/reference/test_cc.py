import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.cc import cc_consecutive_loss, cc_kernel_loss, cc_loss, correlation_matrix
from tests.helpers import assert_rel_close, randn


def exact(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)

S = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
T = torch.tensor([[0.0], [1.0]], dtype=torch.float64)  # G_s - G_t = [[1, 2], [2, 3]], |.|^2 = 18


def test_bilinear_by_hand():
    assert_rel_close(cc_kernel_loss(S, T, "bilinear").mean(), exact(math.sqrt(18) / 4),
                     1e-14)
    assert_rel_close(cc_kernel_loss(S, T, "bilinear", squared=True).mean(),
                     exact(18 / 4), 1e-14)


def test_gaussian_by_hand():
    # order 1, gamma 1/2: K = e^-1 (1 + G), so D = e^-1 (G_s - G_t)
    loss = cc_kernel_loss(S, T, "gaussian", gamma=0.5, order=1).mean()
    assert_rel_close(loss, exact(math.exp(-1) * math.sqrt(18) / 4), 1e-14)


def test_taylor_expansion_tends_to_the_gaussian_kernel_on_unit_vectors():
    q = F.normalize(randn(5, 6, seed=2), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(q, q).pow(2))
    torch.testing.assert_close(correlation_matrix(q, gamma=0.4, order=20), exact)


def test_repdistiller_variant_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    per_row = cc_consecutive_loss(s, torch.zeros_like(s))  # products 3 and 3, mean 3
    torch.testing.assert_close(per_row, torch.tensor([4.5, 4.5, 0.0], dtype=torch.float64))
    assert per_row.mean() == 3.0


@pytest.mark.parametrize("options", [{}, {"kernel": "bilinear"}, {"squared": True},
                                     {"variant": "repdistiller"}])
def test_gradcheck(options):
    s, t = randn(4, 3, seed=3, requires_grad=True), randn(4, 3, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cc_loss(a, b, **options), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: cc_loss(a, b, **options), (s, t))


@pytest.mark.parametrize("kernel", ["gaussian", "bilinear"])
def test_equals_torchdistill_cckd(kernel):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill (peer library) not installed")
    s, t = randn(6, 8, seed=5), randn(6, 11, seed=6)
    config = {"type": kernel, "gamma": 0.4, "max_p": 2}
    for reduction, scale in (("batchmean", 1.0), ("none", 36.0)):
        peer = mid_level.CCKDLoss("s", "t", config, reduction)
        expected = peer({"s": {"output": s}}, {"t": {"output": t}})
        assert_rel_close(cc_kernel_loss(s, t, kernel).mean() * scale, expected, 1e-12)


def test_equals_repdistiller_correlation():
    # RepDistiller's Correlation.forward (distiller_zoo/CC.py), transcribed:
    # mean over i of sum_d |s - t|_i |s - t|_{i+1}
    s, t = randn(5, 7, seed=7), randn(5, 7, seed=8)
    delta = (s - t).abs()
    expected = (delta[:-1] * delta[1:]).sum(1).mean()
    assert_rel_close(cc_consecutive_loss(s, t).mean(), expected, 1e-14)

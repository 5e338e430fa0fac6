import math

import pytest
import torch

import kdfast
from kdfast.functional import ofd_loss, ofd_margin
from kdfast.reference.ofd import margin_from_batchnorm, partial_l2
from tests.helpers import randn


def scalar_margin(scale: float, shift: float) -> float:
    """The margin of one channel, written with math.erf (an independent transcription of the
    authors' get_margin_from_BN)."""
    s, m = abs(scale), shift
    cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    if cdf > 0.001:
        return m - s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf
    return -3 * s


def test_margin_of_a_centred_gaussian_is_minus_two_over_root_two_pi():
    margin = margin_from_batchnorm(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    expected = torch.tensor([-2 / math.sqrt(2 * math.pi), -4 / math.sqrt(2 * math.pi)])
    torch.testing.assert_close(margin, expected)


def test_margin_matches_the_scalar_formula_and_the_fallback():
    weight = torch.tensor([1.0, -0.5, 2.0, 1.0, 0.3], dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0, 3.0, 4.0, 0.0], dtype=torch.float64)  # 4: Phi(-4) < 1e-3
    expected = torch.tensor([scalar_margin(s, m) for s, m in zip(weight.tolist(), bias.tolist(),
                                                                 strict=True)],
                            dtype=torch.float64)
    torch.testing.assert_close(margin_from_batchnorm(weight, bias), expected)
    assert margin_from_batchnorm(weight, bias)[3] == -3.0


def test_margin_is_the_mean_of_the_negative_part_by_sampling():
    g = torch.Generator().manual_seed(0)
    x = 0.7 + 1.5 * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    sampled = x[x < 0].mean()
    margin = margin_from_batchnorm(torch.tensor([1.5], dtype=torch.float64),
                                   torch.tensor([0.7], dtype=torch.float64))
    assert abs(margin.item() - sampled.item()) < 5e-3


def test_partial_l2_hand_computed():
    # channel 0 (margin -1): teacher -2 -> target -1; student -3 is below: not counted;
    # student 0 is above: (0 - -1)^2 = 1. channel 1 (margin -1): teacher 1 > 0: (0.5-1)^2.
    s = torch.tensor([[[[-3.0, 0.0]], [[0.5, 2.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    t = torch.tensor([[[[-2.0, -2.0]], [[1.0, -0.5]]]], dtype=torch.float64)
    margin = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    # channel 1, second entry: target max(-0.5, -1) = -0.5, student 2 > -0.5: 2.5^2
    expected = 1.0 + 0.25 + 6.25
    torch.testing.assert_close(partial_l2(s, t, margin),
                               torch.tensor([expected], dtype=torch.float64))


def test_partial_l2_matches_the_masked_mse_sum():
    s, t = randn(3, 4, 5, 2, seed=0), randn(3, 4, 5, 2, seed=1)
    margin = -randn(4, seed=2).abs()
    target = torch.max(t, margin.view(1, -1, 1, 1))
    mask = ((s > target) | (target > 0)).double()
    total = (torch.nn.functional.mse_loss(s, target, reduction="none") * mask).sum()
    torch.testing.assert_close(partial_l2(s, t, margin).sum(), total)


def test_gradcheck_on_the_student_and_no_gradient_to_the_teacher():
    s = randn(2, 3, 2, 3, seed=3, requires_grad=True)
    t = randn(2, 3, 2, 3, seed=4, requires_grad=True)
    margin = torch.tensor([-0.5, -0.2, -1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: partial_l2(x, t, margin), (s,))
    partial_l2(s, t, margin).sum().backward()
    assert t.grad is None


def test_loss_reductions_and_errors():
    s, t = randn(2, 3, 4, 4, seed=5), randn(2, 3, 4, 4, seed=6)
    margin = ofd_margin(torch.nn.BatchNorm2d(3)).double()
    per_sample = ofd_loss(s, t, margin, reduction="none")
    torch.testing.assert_close(per_sample, partial_l2(s, t, margin))
    torch.testing.assert_close(ofd_loss(s, t, margin), per_sample.mean())
    with pytest.raises(ValueError, match="margin has 4 entries but teacher has 3 channels"):
        ofd_loss(s, t, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="margin must be 1-D"):
        ofd_loss(s, t, margin.view(1, 3, 1, 1))
    with pytest.raises(TypeError, match="batchnorm must be a torch.nn.BatchNorm2d"):
        ofd_margin(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="affine=True"):
        ofd_margin(torch.nn.BatchNorm2d(3, affine=False))


def test_module_connector_margin_buffer_and_state_dict():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    loss = kdfast.OFDLoss(bn, student_channels=3).double()
    s, t = randn(2, 3, 4, 4, seed=7), randn(2, 4, 4, 4, seed=8)
    out = loss(s, t)
    torch.testing.assert_close(out, ofd_loss(loss.connector(s), t, loss.margin))
    torch.testing.assert_close(loss.margin, ofd_margin(bn).double())
    assert "margin" in loss.state_dict() and "connector.0.weight" in loss.state_dict()
    assert loss.connector[0].bias is None
    out.backward()
    assert loss.connector[0].weight.grad is not None
    clone = kdfast.OFDLoss(torch.nn.BatchNorm2d(4), student_channels=3).double()
    clone.load_state_dict(loss.state_dict())
    torch.testing.assert_close(clone(s, t), loss(s, t))
    with pytest.raises(ValueError, match="student_channels must be a positive int"):
        kdfast.OFDLoss(bn, student_channels=0)

"""The softmax-KL reference alone: hand cases, the β limits of the generalised JSD, masked
−inf entries, NaN, and float64 gradcheck / gradgradcheck for every divergence."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.kd import kd_loss
from kdfast.reference.softmax_kl import DIVERGENCES, softmax_kl
from tests.helpers import randn

NEG_INF = float("-inf")


def probabilities(x, temperature):
    return F.softmax(x / temperature, dim=1)


def plain_kl(p, q):
    return (p * (p.log() - q.log())).sum(dim=1)


def test_forward_hand_computed_two_classes():
    # T = 2: s/T = [0, ln2 / 2] -> p_s = [1, sqrt2] / (1 + sqrt2); t = [0, 0] -> p_t = [.5, .5].
    s = torch.tensor([[0.0, math.log(2.0)]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    r2 = math.sqrt(2.0)
    p_s = [1 / (1 + r2), r2 / (1 + r2)]
    forward = 0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])
    reverse = p_s[0] * math.log(p_s[0] / 0.5) + p_s[1] * math.log(p_s[1] / 0.5)
    torch.testing.assert_close(softmax_kl(s, t, 2.0), torch.tensor([4 * forward]).double())
    torch.testing.assert_close(softmax_kl(s, t, 2.0, "reverse"),
                               torch.tensor([4 * reverse]).double())


def test_jsd_hand_computed_half():
    # p_t = [1, 0]-ish is not allowed (finite logits); take p_t = [.8, .2], p_s = [.2, .8].
    t = torch.tensor([[math.log(0.8), math.log(0.2)]], dtype=torch.float64)
    s = torch.tensor([[math.log(0.2), math.log(0.8)]], dtype=torch.float64)
    m = [0.5, 0.5]
    kl_t = 0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])
    expected = 0.5 * kl_t + 0.5 * kl_t  # symmetric case: both KLs are equal
    torch.testing.assert_close(softmax_kl(s, t, 1.0, "jsd", 0.5),
                               torch.tensor([expected]).double())


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_plain_formula(beta):
    s, t = randn(4, 7, seed=0), randn(4, 7, seed=1)
    p_s, p_t = probabilities(s, 3.0), probabilities(t, 3.0)
    m = beta * p_t + (1 - beta) * p_s
    expected = 9.0 * (beta * plain_kl(p_t, m) + (1 - beta) * plain_kl(p_s, m))
    torch.testing.assert_close(softmax_kl(s, t, 3.0, "jsd", beta), expected)


def test_forward_and_reverse_match_plain_formula():
    s, t = randn(4, 7, seed=2), randn(4, 7, seed=3)
    p_s, p_t = probabilities(s, 2.0), probabilities(t, 2.0)
    torch.testing.assert_close(softmax_kl(s, t, 2.0), 4.0 * plain_kl(p_t, p_s))
    torch.testing.assert_close(softmax_kl(s, t, 2.0, "reverse"), 4.0 * plain_kl(p_s, p_t))


def test_jsd_beta_limits_are_the_two_kls():
    s, t = randn(3, 6, seed=4), randn(3, 6, seed=5)
    forward, reverse = softmax_kl(s, t, 2.0), softmax_kl(s, t, 2.0, "reverse")
    assert torch.equal(softmax_kl(s, t, 2.0, "jsd", 0.0), forward)
    assert torch.equal(softmax_kl(s, t, 2.0, "jsd", 1.0), reverse)
    # ... and the limits of JSD(β)/β at 0 and JSD(β)/(1 − β) at 1.
    eps = 1e-7
    torch.testing.assert_close(softmax_kl(s, t, 2.0, "jsd", eps) / eps, forward, rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(softmax_kl(s, t, 2.0, "jsd", 1 - eps) / eps, reverse,
                               rtol=1e-5, atol=0)


def test_kd_reference_goes_through_forward_divergence():
    s, t = randn(5, 9, seed=6), randn(5, 9, seed=7)
    assert torch.equal(kd_loss(s, t, 4.0), softmax_kl(s, t, 4.0, "forward"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_rows_give_zero(divergence):
    s = randn(4, 6, seed=8) * 10
    loss = softmax_kl(s, s.clone(), 4.0, divergence)
    if divergence == "jsd":  # log m = logaddexp(...) rounds: 0 to rounding
        assert loss.abs().max() < 1e-13
    else:
        assert torch.all(loss == 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_entries_contribute_nothing_and_get_zero_gradient(divergence):
    s, t = randn(3, 6, seed=9), randn(3, 6, seed=10)
    s[:, 2] = NEG_INF
    t[:, 2] = NEG_INF
    s.requires_grad_(True)
    t.requires_grad_(True)
    kept = [0, 1, 3, 4, 5]
    loss = softmax_kl(s, t, 2.0, divergence, 0.3)
    expected = softmax_kl(s.detach()[:, kept], t.detach()[:, kept], 2.0, divergence, 0.3)
    torch.testing.assert_close(loss, expected)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t))
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert torch.all(grad_s[:, 2] == 0) and torch.all(grad_t[:, 2] == 0)


def test_one_sided_mask():
    s, t = randn(2, 5, seed=11), randn(2, 5, seed=12)
    s[0, 1] = NEG_INF  # student −inf where the teacher has mass: forward KL is +inf
    assert softmax_kl(s, t, 1.0)[0] == math.inf
    assert torch.isfinite(softmax_kl(s, t, 1.0)[1])
    assert torch.isfinite(softmax_kl(s, t, 1.0, "reverse")).all()
    assert torch.isfinite(softmax_kl(s, t, 1.0, "jsd", 0.5)).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_give_nan(divergence, bad):
    s, t = randn(2, 5, seed=13), randn(2, 5, seed=14)
    t[0, 3] = bad
    loss = softmax_kl(s, t, 1.0, divergence)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


def test_low_precision_inputs_return_float32():
    s, t = randn(2, 5, seed=15).half(), randn(2, 5, seed=16).bfloat16()
    assert softmax_kl(s, t.half(), 2.0).dtype == torch.float32
    assert softmax_kl(s.bfloat16(), t, 2.0, "jsd").dtype == torch.float32


def test_bad_options_raise():
    s = randn(2, 3)
    with pytest.raises(ValueError, match="divergence must be one of"):
        softmax_kl(s, s, 1.0, "symmetric")
    with pytest.raises(ValueError, match="beta must be in"):
        softmax_kl(s, s, 1.0, "jsd", 1.5)


@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5),
                                             ("jsd", 0.5), ("jsd", 0.2)])
def test_gradcheck_and_gradgradcheck(divergence, beta):
    s = randn(3, 5, seed=17, requires_grad=True)
    t = randn(3, 5, seed=18, requires_grad=True)

    def fn(a, b):
        return softmax_kl(a, b, 1.7, divergence, beta)

    assert torch.autograd.gradcheck(fn, (s, t))
    assert torch.autograd.gradgradcheck(fn, (s, t))

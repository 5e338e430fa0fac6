import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.kd import dml_loss, kd_loss
from tests.helpers import randn


def test_kd_hand_computed_two_classes():
    # T = 2: s/T = [0, ln2 / 2] -> p_s = [1, sqrt2] / (1 + sqrt2); t = [0, 0] -> p_t = [.5, .5].
    s = torch.tensor([[0.0, math.log(2.0)]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    r2 = math.sqrt(2.0)
    p_s = [1 / (1 + r2), r2 / (1 + r2)]
    kl = 0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])
    torch.testing.assert_close(kd_loss(s, t, 2.0), torch.tensor([4.0 * kl], dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_matches_kl_div_batchmean(temperature):
    s, t = randn(5, 7, seed=0), randn(5, 7, seed=1)
    expected = temperature**2 * F.kl_div(F.log_softmax(s / temperature, 1),
                                         F.log_softmax(t / temperature, 1),
                                         reduction="batchmean", log_target=True)
    torch.testing.assert_close(kd_loss(s, t, temperature).mean(), expected)


@pytest.mark.parametrize("temperature,batch", [(4.0, 3), (1.0, 1), (2.5, 6)])
def test_kd_gradient_is_t_over_b_times_probability_difference(temperature, batch):
    s = randn(batch, 9, seed=2, requires_grad=True)
    t = randn(batch, 9, seed=3)
    (grad,) = torch.autograd.grad(kd_loss(s, t, temperature).mean(), s)
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    torch.testing.assert_close(grad, temperature / batch * (p_s - p_t))


def test_kd_identical_logits_give_zero():
    s = randn(4, 6, seed=4) * 10
    assert torch.all(kd_loss(s, s.clone(), 4.0) == 0)


def test_kd_is_positive_for_different_logits():
    assert torch.all(kd_loss(randn(4, 6, seed=5), randn(4, 6, seed=6), 4.0) > 0)


def test_kd_large_logits_stay_finite():
    # float32 logits of 1e4: softmax saturates to one-hot; KL = log p_t - log p_s = 1e4 exactly.
    s = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    t = torch.tensor([[0.0, 1e4, -1e4]])
    loss = kd_loss(s, t, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    torch.testing.assert_close(loss, torch.tensor([1e4]))
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1.0, 0.0]]))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_gradcheck(temperature):
    s = randn(3, 5, seed=7, requires_grad=True)
    t = randn(3, 5, seed=8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, temperature), (s, t))


def test_dml_one_peer_is_kd_with_detached_peer():
    z, peer = randn(4, 5, seed=9, requires_grad=True), randn(4, 5, seed=10, requires_grad=True)
    out = dml_loss(z, [peer], 2.0)
    torch.testing.assert_close(out, kd_loss(z, peer.detach(), 2.0))
    grad_z, grad_peer = torch.autograd.grad(out.sum(), (z, peer), allow_unused=True)
    assert grad_peer is None and grad_z.abs().sum() > 0


def test_dml_averages_over_peers():
    z, a, b = randn(3, 4, seed=11), randn(3, 4, seed=12), randn(3, 4, seed=13)
    torch.testing.assert_close(dml_loss(z, [a, b], 1.0),
                               (kd_loss(z, a, 1.0) + kd_loss(z, b, 1.0)) / 2)


def test_dml_gradcheck():
    z = randn(2, 4, seed=14, requires_grad=True)
    peers = [randn(2, 4, seed=15), randn(2, 4, seed=16)]
    assert torch.autograd.gradcheck(lambda x: dml_loss(x, peers, 1.5), (z,))


# --- masked logits: -inf at the same classes in student and teacher -------------------------

INF = float("inf")
MASK = torch.tensor([[False, True, False, False, True, False],
                     [True, False, False, False, False, False],
                     [False, False, False, False, False, False]])


def masked(logits: torch.Tensor, mask: torch.Tensor = MASK) -> torch.Tensor:
    return logits.masked_fill(mask, -INF)


def hand_kl_over_kept(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, temperature):
    """T² KL(p_t || p_s) per row with both softmaxes over the unmasked columns only."""
    values = []
    for row in range(s.shape[0]):
        keep = ~mask[row]
        p_t = F.softmax(t[row, keep] / temperature, 0)
        log_p_s = F.log_softmax(s[row, keep] / temperature, 0)
        values.append(temperature**2 * (p_t * (p_t.log() - log_p_s)).sum())
    return torch.stack(values)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_masked_classes_give_the_kl_of_the_kept_ones(temperature):
    s, t = randn(3, 6, seed=20), randn(3, 6, seed=21)
    out = kd_loss(masked(s), masked(t), temperature)
    torch.testing.assert_close(out, hand_kl_over_kept(s, t, MASK, temperature))


def test_kd_masked_classes_get_exactly_zero_gradient():
    s = masked(randn(3, 6, seed=22)).requires_grad_()
    t = masked(randn(3, 6, seed=23)).requires_grad_()
    grad_s, grad_t = torch.autograd.grad(kd_loss(s, t, 2.0).sum(), (s, t))
    for grad in (grad_s, grad_t):
        assert torch.isfinite(grad).all()
        assert torch.all(grad[MASK] == 0)
    # Elsewhere the KD gradient formula (T/B)(p_s - p_t) per row, here with B = 1 per row.
    p_s, p_t = F.softmax(s.detach() / 2.0, 1), F.softmax(t.detach() / 2.0, 1)
    torch.testing.assert_close(grad_s, 2.0 * (p_s - p_t))


def test_kd_student_minus_inf_where_the_teacher_has_mass_is_plus_inf():
    s, t = randn(2, 4, seed=24), randn(2, 4, seed=25)
    s[0, 2] = -INF
    out = kd_loss(s, t, 3.0)
    assert out[0] == INF and torch.isfinite(out[1])


def test_kd_teacher_only_masked_classes_contribute_zero():
    # p_t = 0 there: KL = Σ_kept p_t (log p_t − log p_s), log p_s over all columns.
    s, t = randn(2, 5, seed=26), randn(2, 5, seed=27)
    t[:, 1] = -INF
    log_p_s = F.log_softmax(s, 1)
    p_t = F.softmax(t, 1)
    keep = torch.arange(5) != 1
    expected = (p_t[:, keep] * (p_t[:, keep].log() - log_p_s[:, keep])).sum(1)
    torch.testing.assert_close(kd_loss(s, t, 1.0), expected)


def test_kd_nan_and_plus_inf_logits_give_nan():
    for bad in (float("nan"), INF):
        for side in (0, 1):
            pair = [randn(2, 4, seed=28), randn(2, 4, seed=29)]
            pair[side][0, 1] = bad
            out = kd_loss(*pair, 1.0)
            assert torch.isnan(out[0]) and torch.isfinite(out[1])


def test_dml_masked_classes_give_the_kl_of_the_kept_ones():
    z = masked(randn(3, 6, seed=30)).requires_grad_()
    peers = [masked(randn(3, 6, seed=31)), masked(randn(3, 6, seed=32))]
    out = dml_loss(z, peers, 2.0)
    expected = sum(hand_kl_over_kept(z.detach(), p, MASK, 2.0) for p in peers) / 2
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.isfinite(grad).all() and torch.all(grad[MASK] == 0)

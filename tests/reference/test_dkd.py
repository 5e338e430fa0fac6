"""The DKD reference: hand cases, the decomposition of KD, mdistiller's formula, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.dkd import dkd_loss, nckd, tckd, without_gold
from kdfast.reference.kd import kd_loss
from tests.helpers import assert_rel_close, randn


def mdistiller_dkd(student, teacher, targets, alpha, beta, temperature):
    """Per-sample DKD written out from mdistiller's ``dkd_loss`` (an independent transcription
    of its formula: masked sums of the softmax for TCKD, the ``- 1000 * gold`` trick for
    NCKD), for comparison only."""
    gold = F.one_hot(targets, student.shape[1]).to(student.dtype)

    def binary(p):
        return torch.stack([(p * gold).sum(1), (p * (1 - gold)).sum(1)], dim=1)

    b_s = binary(F.softmax(student / temperature, 1))
    b_t = binary(F.softmax(teacher / temperature, 1))
    tckd_md = (b_t * (b_t.log() - b_s.log())).sum(1)
    log_s = F.log_softmax(student / temperature - 1000.0 * gold, 1)
    log_t = F.log_softmax(teacher / temperature - 1000.0 * gold, 1)
    nckd_md = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
    return temperature**2 * (alpha * tckd_md + beta * nckd_md)


def test_hand_computed_three_classes():
    # T = 1, gold 0: p_s = (1/3, 1/3, 1/3), p_t = (1/4, 1/2, 1/4).
    s = torch.zeros(1, 3, dtype=torch.float64)
    t = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    s_others, t_others = without_gold(s, y), without_gold(t, y)
    # b_s = (1/3, 2/3), b_t = (1/4, 3/4); p̂_s = (1/2, 1/2), p̂_t = (2/3, 1/3).
    expected_tckd = 0.25 * math.log(0.75) + 0.75 * math.log(9 / 8)
    expected_nckd = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    torch.testing.assert_close(tckd(s, t, s_others, t_others, y, 1.0),
                               torch.tensor([expected_tckd], dtype=torch.float64))
    torch.testing.assert_close(nckd(s_others, t_others, 1.0),
                               torch.tensor([expected_nckd], dtype=torch.float64))
    torch.testing.assert_close(dkd_loss(s, t, y, 1.0, 2.0, 3.0),
                               torch.tensor([2 * expected_tckd + 3 * expected_nckd],
                                            dtype=torch.float64))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_teacher_non_target_mass_times_nckd(temperature):
    # The decomposition of the paper: KD = TCKD + (1 - p_t,g) * NCKD.
    s, t = randn(5, 7, seed=0) * 2, randn(5, 7, seed=1) * 2
    y = torch.tensor([0, 3, 6, 2, 2])
    s_others, t_others = without_gold(s, y), without_gold(t, y)
    p_t_gold = F.softmax(t / temperature, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(kd_loss(s, t, temperature),
                               tckd(s, t, s_others, t_others, y, temperature)
                               + (1 - p_t_gold) * nckd(s_others, t_others, temperature))


def test_two_classes_is_kd():
    # One non-gold class: NCKD = 0 and the binary distributions are the softmaxes themselves.
    s, t = randn(4, 2, seed=2), randn(4, 2, seed=3)
    y = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(nckd(without_gold(s, y), without_gold(t, y), 4.0),
                               torch.zeros(4, dtype=s.dtype))
    torch.testing.assert_close(dkd_loss(s, t, y, 4.0, 1.0, 8.0), kd_loss(s, t, 4.0))


def test_identical_logits_give_zero():
    s = randn(3, 6, seed=4) * 5
    assert torch.all(dkd_loss(s, s.clone(), torch.tensor([1, 2, 5])) == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_mdistiller_formula_at_normal_logits(dtype):
    s = randn(6, 10, seed=5).to(dtype).requires_grad_()
    t = randn(6, 10, seed=6).to(dtype) * 3
    y = torch.tensor([0, 9, 3, 3, 1, 7])
    ours = dkd_loss(s, t, y, 4.0, 1.0, 8.0)
    theirs = mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert_rel_close(ours, theirs, tol, "loss")
    (g_ours,) = torch.autograd.grad(ours.sum(), s)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), s)
    assert_rel_close(g_ours, g_theirs, tol, "gradient")


def test_confident_logits_stay_finite_where_mdistiller_overflows():
    # float32, T = 1: the student puts e^-200 (0 in float32) on the gold class. The log-space
    # binary distributions keep log p_s,g = -200 exactly; mdistiller's log(sum of softmax)
    # is log 0 = -inf and its TCKD +inf.
    s = torch.tensor([[0.0, 200.0, 0.0]])
    t = torch.zeros(1, 3)
    y = torch.tensor([0])
    # b_t = (1/3, 2/3); log b_s = (-200, 0) to float32 precision.
    expected = 1 / 3 * (math.log(1 / 3) + 200.0) + 2 / 3 * math.log(2 / 3)
    torch.testing.assert_close(tckd(s, t, without_gold(s, y), without_gold(t, y), y, 1.0),
                               torch.tensor([expected]))
    assert torch.isinf(mdistiller_dkd(s, t, y, 1.0, 0.0, 1.0)).all()


def test_gradients_do_not_reach_the_gold_logit_through_nckd():
    s, t = randn(3, 5, seed=7, requires_grad=True), randn(3, 5, seed=8)
    y = torch.tensor([4, 0, 2])
    (grad,) = torch.autograd.grad(nckd(without_gold(s, y), without_gold(t, y), 2.0).sum(), s)
    assert torch.all(grad[torch.arange(3), y] == 0)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradcheck_and_gradgradcheck():
    s = randn(3, 5, seed=9, requires_grad=True)
    t = randn(3, 5, seed=10, requires_grad=True)
    y = torch.tensor([1, 4, 0])

    def fn(a, b):
        return dkd_loss(a, b, y, 2.0, 1.0, 8.0)

    assert torch.autograd.gradcheck(fn, (s, t))
    assert torch.autograd.gradgradcheck(fn, (s, t))

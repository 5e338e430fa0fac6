"""The WSLD reference: the weights, the soft cross-entropy, mmrazor's WSLD formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.wsld import sample_weights, softened_entropy, wsld_loss
from tests.helpers import assert_rel_close, randn


def mmrazor_wsld(student, teacher, targets, tau):
    """Per-sample WSLD written out from mmrazor's ``WSLD`` (an independent transcription of
    its formula: the soft cross-entropy, weights from detached label cross-entropies), for
    comparison only; its loss is the batch mean of this."""
    soft_ce = -(F.softmax(teacher / tau, 1) * F.log_softmax(student / tau, 1)).sum(1)
    one_hot = F.one_hot(targets, student.shape[1]).to(student.dtype)
    ce_s = -(one_hot * F.log_softmax(student.detach(), 1)).sum(1)
    ce_t = -(one_hot * F.log_softmax(teacher.detach(), 1)).sum(1)
    weight = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0.0))
    return tau**2 * weight * soft_ce


def test_hand_computed_weight_and_loss():
    # Two classes, T = 1, label 0. Student p = (1/2, 1/2): CE_s = ln 2; teacher p = (2/3, 1/3):
    # CE_t = ln 1.5; H(p_t, p_s) = ln 2.
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    weight = 1 - math.exp(-math.log(2) / (math.log(1.5) + 1e-7))
    torch.testing.assert_close(sample_weights(s, t, y), torch.tensor([weight],
                                                                     dtype=torch.float64))
    torch.testing.assert_close(wsld_loss(s, t, y, 1.0), torch.tensor([weight * math.log(2)],
                                                                     dtype=torch.float64))


def test_softened_entropy_of_uniform_is_t_squared_log_c():
    z = torch.zeros(2, 5, dtype=torch.float64)
    torch.testing.assert_close(softened_entropy(z, 3.0), torch.full((2,), 9 * math.log(5),
                                                                    dtype=torch.float64))


def test_identical_logits_give_the_weighted_teacher_entropy():
    # CE_s = CE_t: w = 1 - exp(-CE/(CE + 1e-7)), and the KL part is 0.
    s = randn(3, 4, seed=0)
    y = torch.tensor([0, 1, 3])
    torch.testing.assert_close(wsld_loss(s, s.clone(), y, 2.0),
                               sample_weights(s, s, y) * softened_entropy(s, 2.0))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_mmrazor_formula_values_and_gradients(tau):
    s = randn(6, 10, seed=1, requires_grad=True)
    t = (randn(6, 10, seed=2) * 3).requires_grad_()
    y = torch.tensor([0, 9, 3, 3, 1, 7])
    ours, theirs = wsld_loss(s, t, y, tau), mmrazor_wsld(s, t, y, tau)
    assert_rel_close(ours, theirs, 1e-12, "loss")
    for ours_grad, their_grad in zip(torch.autograd.grad(ours.sum(), (s, t)),
                                     torch.autograd.grad(theirs.sum(), (s, t)), strict=True):
        assert_rel_close(ours_grad, their_grad, 1e-12, "gradient")


def test_the_weight_is_a_constant_of_the_gradient():
    s = randn(3, 5, seed=3, requires_grad=True)
    t = randn(3, 5, seed=4)
    y = torch.tensor([1, 2, 4])
    (grad,) = torch.autograd.grad(wsld_loss(s, t, y, 2.0).sum(), s)
    weights = sample_weights(s, t, y)
    # d/ds of T^2 H(p_t, p_s) is T (p_s - p_t), scaled per sample by the weight.
    expected = weights[:, None] * 2.0 * (F.softmax(s / 2, 1) - F.softmax(t / 2, 1))
    torch.testing.assert_close(grad, expected)


def test_gradcheck_of_the_soft_cross_entropy_parts():
    # The loss as a whole is not differentiable numerically (the weight is detached), so the
    # parts that carry gradient are checked: the teacher entropy (the KL is the core's).
    t = randn(3, 5, seed=5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: softened_entropy(x, 2.0), (t,))
    assert torch.autograd.gradgradcheck(lambda x: softened_entropy(x, 2.0), (t,))

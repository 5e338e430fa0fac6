"""The DIST reference: hand cases, torchdistill's DISTLoss and mmrazor's formula, gradients."""

import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.dist import dist_loss, pearson_rows
from tests.helpers import assert_rel_close, randn


def mmrazor_dist(student, teacher, inter_weight, intra_weight, tau, eps=1e-8):
    """DIST written out from mmrazor's ``DISTLoss`` (an independent transcription of its
    formula: the cosine divides by ||a|| ||b|| + eps), for comparison only."""
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = F.softmax(student / tau, 1), F.softmax(teacher / tau, 1)
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.t(), y_t.t()).mean()
    return tau**2 * (inter_weight * inter + intra_weight * intra)


def test_pearson_is_one_for_affine_related_rows_and_minus_one_for_reversed():
    a = randn(3, 6, seed=0)
    torch.testing.assert_close(pearson_rows(a, 2.0 * a + 5.0), torch.ones(3, dtype=a.dtype))
    torch.testing.assert_close(pearson_rows(a, -a), -torch.ones(3, dtype=a.dtype))


def test_hand_computed_anti_correlated_two_by_two():
    # Every row and every column of the teacher's softmax is the student's reversed: all the
    # correlations are -1, so inter = intra = 2 and the loss is tau^2 (2 beta + 2 gamma).
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = s.flip(1)
    per_sample = dist_loss(s, t, temperature=2.0, beta=1.0, gamma=0.5)
    torch.testing.assert_close(per_sample, torch.full((2,), 4.0 * (2.0 + 1.0),
                                                      dtype=torch.float64))


def test_identical_logits_give_zero():
    s = randn(4, 7, seed=1)
    assert_rel_close(dist_loss(s, s.clone()), torch.zeros(4, dtype=s.dtype), 0.0, atol=1e-14)


def test_per_sample_values_carry_the_shared_intra_class_term():
    s, t = randn(5, 7, seed=2), randn(5, 7, seed=3)
    inter_only = dist_loss(s, t, gamma=0.0)
    intra_only = dist_loss(s, t, beta=0.0)
    assert torch.allclose(intra_only, intra_only[0].expand(5))
    torch.testing.assert_close(dist_loss(s, t), inter_only + intra_only)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0)])
def test_matches_torchdistill_dist_loss(beta, gamma, tau):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill is not installed")
    s, t = randn(6, 10, seed=4) * 2, randn(6, 10, seed=5) * 2
    theirs = mid_level.DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma,
                                tau=tau)({".": {"output": s}}, {".": {"output": t}})
    assert_rel_close(dist_loss(s, t, tau, beta, gamma).mean(), theirs, 1e-12)


def test_agrees_with_mmrazor_formula_to_its_eps():
    s, t = randn(6, 10, seed=6) * 2, randn(6, 10, seed=7) * 2
    assert_rel_close(dist_loss(s, t).mean(), mmrazor_dist(s, t, 1.0, 1.0, 1.0), 1e-6)


def test_gradcheck_and_gradgradcheck():
    s = randn(3, 5, seed=8, requires_grad=True)
    t = randn(3, 5, seed=9, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dist_loss(a, b, 2.0), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: dist_loss(a, b, 2.0), (s, t))

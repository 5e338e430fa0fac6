import pytest
import torch

from kdfast.reference.ab import ab_loss
from tests.helpers import randn


def test_hand_computed_branches():
    # margin 1; one sample, four positions (as (1, 4, 1, 1)):
    # s=0.5, t=-1 : teacher off, student above -m -> (0.5 + 1)^2 = 2.25
    # s=-2,  t=-1 : teacher off, student already below -m -> 0
    # s=0.5, t=2  : teacher on, student below m -> (0.5 - 1)^2 = 0.25
    # s=3,   t=2  : teacher on, student already above m -> 0
    s = torch.tensor([0.5, -2.0, 0.5, 3.0], dtype=torch.float64).view(1, 4, 1, 1)
    t = torch.tensor([-1.0, -1.0, 2.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    torch.testing.assert_close(ab_loss(s, t, 1.0), torch.tensor([2.5], dtype=torch.float64))
    # margin 0.25: (0.75)^2, and s=0.5 is now beyond the margin on the "on" side -> 0
    torch.testing.assert_close(ab_loss(s, t, 0.25), torch.tensor([0.5625], dtype=torch.float64))


def test_teacher_zero_counts_as_off():
    s = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    t = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(ab_loss(s, t, 1.0), torch.tensor([1.0], dtype=torch.float64))


def test_per_sample_sum_over_elements():
    s, t = randn(3, 2, 4, 5, seed=0), randn(3, 2, 4, 5, seed=1)
    per_sample = ab_loss(s, t, 1.0)
    assert per_sample.shape == (3,)
    one = ab_loss(s[1:2], t[1:2], 1.0)
    torch.testing.assert_close(per_sample[1:2], one)


def test_student_matching_teacher_boundaries_beyond_margin_gives_zero():
    t = randn(2, 3, 4, 4, seed=4)
    s = torch.where(t > 0, t.abs() + 1.0, -t.abs() - 1.0)  # |s| >= m on the teacher's side
    assert torch.all(ab_loss(s, t, 1.0) == 0)


def test_teacher_gets_no_gradient():
    s = randn(2, 3, 4, 4, seed=5, requires_grad=True)
    t = randn(2, 3, 4, 4, seed=6, requires_grad=True)
    ab_loss(s, t, 1.0).sum().backward()
    assert t.grad is None or torch.all(t.grad == 0)
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_gradcheck(margin):
    s = randn(2, 3, 2, 3, seed=7, requires_grad=True)
    t = randn(2, 3, 2, 3, seed=8)
    assert torch.autograd.gradcheck(lambda a: ab_loss(a, t, margin), (s,))

import math

import pytest
import torch

from kdfast.reference.gram import batch_gram, cosine_gram
from kdfast.reference.pkt import conditional_probabilities, pkt_loss
from tests.helpers import assert_rel_close, randn


def exact(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def test_gram_helpers_are_the_pairwise_inner_products():
    x = randn(3, 2, 2, seed=0)
    q = x.reshape(3, -1)
    torch.testing.assert_close(batch_gram(x), q @ q.t())
    unit = q / q.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cosine_gram(x, 0.0), unit @ unit.t())


def test_orthogonal_teacher_parallel_student_by_hand():
    teacher = torch.eye(2, dtype=torch.float64)  # cosines I: P_t = [[2/3, 1/3], [1/3, 2/3]]
    student = torch.ones(2, 2, dtype=torch.float64)  # cosines all 1: P_s = 1/2
    expected = 2 * (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / 4
    assert_rel_close(pkt_loss(student, teacher).mean(), exact(expected), 1e-6)
    torch.testing.assert_close(conditional_probabilities(teacher),
                               torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]],
                                            dtype=torch.float64), atol=1e-6, rtol=0)


def test_zero_for_equal_inputs_and_invariant_to_positive_scale():
    s, t = randn(5, 7, seed=1), randn(5, 3, seed=2)
    assert pkt_loss(t, t).abs().max() == 0
    assert_rel_close(pkt_loss(3.0 * s, 0.5 * t), pkt_loss(s, t), 1e-6)


def test_zero_rows_stay_finite():
    s = randn(4, 6, seed=3)
    s[1] = 0
    assert torch.isfinite(pkt_loss(s, randn(4, 6, seed=4))).all()


def test_gradcheck_and_gradgradcheck():
    s, t = randn(4, 5, seed=5, requires_grad=True), randn(4, 3, seed=6, requires_grad=True)
    assert torch.autograd.gradcheck(pkt_loss, (s, t))
    assert torch.autograd.gradgradcheck(pkt_loss, (s, t))


@pytest.mark.parametrize("d_t", [8, 13])
def test_equals_torchdistill_pkt(d_t):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill (peer library) not installed")
    s, t = randn(6, 8, seed=7), randn(6, d_t, seed=8)
    peer = mid_level.PKTLoss("s", "output", "t", "output")
    expected = peer({"s": {"output": s.clone()}}, {"t": {"output": t.clone()}})
    assert_rel_close(pkt_loss(s, t).mean(), expected, 1e-12)

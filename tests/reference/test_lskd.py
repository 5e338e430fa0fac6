"""The LSKD reference: the z-score, its invariances, torchdistill's LogitStdKDLoss."""

import pytest
import torch

from kdfast.reference.kd import kd_loss
from kdfast.reference.lskd import lskd_loss, standardize
from tests.helpers import assert_rel_close, randn


def test_standardize_uses_the_unbiased_std_plus_eps():
    # [1, 2, 3]: mean 2, unbiased std 1 (the biased one would be sqrt(2/3)).
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(standardize(z), torch.tensor([[-1.0, 0.0, 1.0]],
                                                            dtype=torch.float64) / (1 + 1e-7))


def test_constant_logits_standardize_to_zero():
    assert torch.all(standardize(torch.full((2, 4), 3.5, dtype=torch.float64)) == 0)


def test_is_kd_of_the_standardized_logits():
    s, t = randn(4, 6, seed=0), randn(4, 6, seed=1)
    torch.testing.assert_close(lskd_loss(s, t, 2.0), kd_loss(standardize(s), standardize(t),
                                                             2.0))


def test_invariant_to_shift_and_positive_scale_of_either_logits():
    s, t = randn(4, 6, seed=2), randn(4, 6, seed=3)
    assert_rel_close(lskd_loss(3.0 * s + 7.0, 0.5 * t - 2.0, 2.0), lskd_loss(s, t, 2.0), 1e-6)


def test_a_rescaled_teacher_gives_zero():
    # The point of the paper: a student matching the teacher up to scale and shift is perfect.
    s = randn(3, 5, seed=4)
    assert_rel_close(lskd_loss(s, 10.0 * s + 1.0, 2.0), torch.zeros(3, dtype=s.dtype), 0.0,
                     atol=1e-12)


@pytest.mark.parametrize("temperature", [2.0, 1.0, 4.0])
def test_matches_torchdistill_logit_std_kd_loss(temperature):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill is not installed")
    s, t = randn(5, 9, seed=5) * 3, randn(5, 9, seed=6) * 3
    # beta is given because torchdistill computes 1 - alpha when it is None; without alpha
    # (and without targets) it returns the plain batch-mean KL, without T^2.
    theirs = mid_level.LogitStdKDLoss(".", "output", ".", "output", temperature=temperature,
                                      beta=1.0)({".": {"output": s}}, {".": {"output": t}})
    assert_rel_close(lskd_loss(s, t, temperature).mean(), temperature**2 * theirs, 1e-12)


def test_gradcheck_and_gradgradcheck():
    s = randn(3, 5, seed=7, requires_grad=True)
    t = randn(3, 5, seed=8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lskd_loss(a, b, 2.0), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: lskd_loss(a, b, 2.0), (s, t))

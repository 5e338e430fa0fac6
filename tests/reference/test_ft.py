import pytest
import torch
import torch.nn.functional as F

from kdfast.reference.ft import factor_vector, ft_loss
from tests.helpers import assert_rel_close, randn


def test_repdistiller_mode_by_hand():
    student = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]], dtype=torch.float64)  # mean F^2 [1, 0]
    teacher = torch.tensor([[[[0.0, 3.0]]]], dtype=torch.float64)  # mean F^2 [0, 9]
    torch.testing.assert_close(factor_vector(student), torch.tensor([[1.0, 0.0]],
                                                                    dtype=torch.float64))
    torch.testing.assert_close(ft_loss(student, teacher), torch.ones(1, dtype=torch.float64))


def test_paper_mode_by_hand():
    student = torch.tensor([[[[3.0, 4.0]]]], dtype=torch.float64)  # unit vector [0.6, 0.8]
    teacher = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)  # [0, 1]
    torch.testing.assert_close(ft_loss(student, teacher, "paper"),
                               torch.tensor([(0.6 + 0.2) / 2], dtype=torch.float64))


@pytest.mark.parametrize("mode", ["repdistiller", "paper"])
def test_zero_for_equal_factors_and_invariant_to_positive_scale(mode):
    s, t = randn(2, 3, 4, 4, seed=0), randn(2, 3, 4, 4, seed=1)
    assert ft_loss(t, t, mode).abs().max() == 0
    assert_rel_close(ft_loss(2.5 * s, 0.1 * t, mode), ft_loss(s, t, mode), 1e-13)


def test_all_zero_factor_is_finite():
    assert torch.isfinite(ft_loss(torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3))).all()


@pytest.mark.parametrize("mode", ["repdistiller", "paper"])
def test_gradcheck(mode):
    s, t = randn(2, 3, 2, 2, seed=2, requires_grad=True), randn(2, 3, 2, 2, seed=3)
    assert torch.autograd.gradcheck(lambda a: ft_loss(a, t, mode), (s,))


def test_equals_repdistiller_factor_transfer():
    # RepDistiller's FactorTransfer(p1=2, p2=1) on equal sizes, transcribed:
    # mean |normalize(mean_c f_s^2) - normalize(mean_c f_t^2)|
    s, t = randn(3, 4, 5, 5, seed=4), randn(3, 6, 5, 5, seed=5)

    def factor(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    assert_rel_close(ft_loss(s, t).mean(), (factor(s) - factor(t)).abs().mean(), 1e-14)


def test_equals_torchdistill_ft_in_paper_mode():
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill (peer library) not installed")
    s, t = randn(3, 4, 5, 5, seed=6), randn(3, 4, 5, 5, seed=7)
    peer = mid_level.FTLoss(p=1, reduction="mean")
    expected = peer({"translator": {"output": s}}, {"paraphraser": {"output": t}})
    assert_rel_close(ft_loss(s, t, "paper").mean(), expected, 1e-13)

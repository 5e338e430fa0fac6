import pytest
import torch

from kdfast.reference.sp import similarity_loss, similarity_matrix
from tests.helpers import randn


def test_hand_computed():
    # Student Q = [[1, 0], [1, 1]] -> QQ^T = [[1, 1], [1, 2]]
    #   -> G_s = [[1, 1] / sqrt 2, [1, 2] / sqrt 5]. Teacher Q = I -> G_t = I.
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.eye(2, dtype=torch.float64)
    r2, r5 = 2.0**0.5, 5.0**0.5
    row0 = (1 - 1 / r2) ** 2 + (1 / r2) ** 2
    row1 = (1 / r5) ** 2 + (1 - 2 / r5) ** 2
    expected = torch.tensor([row0 / 2, row1 / 2], dtype=torch.float64)
    torch.testing.assert_close(similarity_loss(s, t), expected)


def test_mean_of_rows_is_frobenius_over_b_squared():
    s, t = randn(5, 3, 4, 4, seed=0), randn(5, 7, 2, 2, seed=1)
    g_s = similarity_matrix(s)
    g_t = similarity_matrix(t)
    expected = (g_t - g_s).pow(2).sum() / 25
    torch.testing.assert_close(similarity_loss(s, t).mean(), expected)
    torch.testing.assert_close(similarity_loss(s, t)[2], (g_t - g_s)[2].pow(2).sum() / 5)


def test_rows_have_unit_norm():
    g = similarity_matrix(randn(4, 10, seed=2))
    torch.testing.assert_close(g.norm(dim=1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("scale", [0.01, 3.0, 1e4])
def test_scale_invariance(scale):
    s, t = randn(4, 3, 5, 5, seed=3), randn(4, 6, 5, 5, seed=4)
    torch.testing.assert_close(similarity_loss(scale * s, t), similarity_loss(s, t))
    torch.testing.assert_close(similarity_loss(s, scale * t), similarity_loss(s, t))


def test_identical_and_rank_agnostic():
    s = randn(3, 4, 2, 2, seed=5)
    assert torch.allclose(similarity_loss(s, s.flatten(1)), torch.zeros(3, dtype=s.dtype))


def test_all_zero_sample_gives_no_nan():
    s = randn(3, 8, seed=6)
    s[1] = 0
    out = similarity_loss(s.requires_grad_(), randn(3, 5, seed=7))
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(grad).all()


def test_half_inputs_are_computed_in_float32():
    s = (100 * torch.randn(4, 4096)).half()  # Q Q^T entries ~4e7: overflow in float16
    out = similarity_loss(s, s.clone())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradcheck():
    s = randn(3, 2, 2, 2, seed=8, requires_grad=True)
    t = randn(3, 5, seed=9, requires_grad=True)
    assert torch.autograd.gradcheck(similarity_loss, (s, t))

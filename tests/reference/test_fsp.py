import torch

from kdfast.reference.fsp import fsp_matrix, fsp_pair_loss, naive_fsp_pair_loss
from tests.helpers import randn


def test_fsp_matrix_hand_computed():
    # X_a = [[1, 2]], X_b = [[3, 4], [1, -1]] (HW = 2): G = [[1*3 + 2*4, 1*1 - 2]] / 2
    a = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[3.0, 4.0]], [[1.0, -1.0]]]], dtype=torch.float64)
    torch.testing.assert_close(fsp_matrix(a, b),
                               torch.tensor([[[5.5, -0.5]]], dtype=torch.float64))


def test_fsp_matrix_matches_loops():
    a, b = randn(2, 3, 4, 5, seed=0), randn(2, 2, 4, 5, seed=1)
    g = fsp_matrix(a, b)
    assert g.shape == (2, 3, 2)
    for n in range(2):
        for i in range(3):
            for j in range(2):
                torch.testing.assert_close(g[n, i, j], (a[n, i] * b[n, j]).mean())


def test_pair_loss_is_mean_over_channels_of_squared_difference():
    sa, sb = randn(3, 2, 4, 4, seed=2), randn(3, 5, 4, 4, seed=3)
    ta, tb = randn(3, 2, 2, 2, seed=4), randn(3, 5, 2, 2, seed=5)  # teacher HW differs
    diff = fsp_matrix(sa, sb) - fsp_matrix(ta, tb)
    torch.testing.assert_close(fsp_pair_loss(sa, sb, ta, tb), diff.pow(2).mean(dim=(1, 2)))


def test_identical_gives_zero():
    a, b = randn(2, 3, 4, 4, seed=6), randn(2, 4, 4, 4, seed=7)
    assert torch.all(fsp_pair_loss(a, b, a.clone(), b.clone()) == 0)


def test_naive_equals_reference():
    sa, sb = randn(2, 3, 5, 3, seed=8), randn(2, 4, 5, 3, seed=9)
    ta, tb = randn(2, 3, 5, 3, seed=10), randn(2, 4, 5, 3, seed=11)
    torch.testing.assert_close(naive_fsp_pair_loss(sa, sb, ta, tb),
                               fsp_pair_loss(sa, sb, ta, tb))


def test_half_inputs_are_computed_in_float32():
    a = (30 * torch.randn(2, 3, 64, 64)).half()  # sums of 4096 products ~ 4e6
    out = fsp_pair_loss(a, a, a * 0.5, a)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradcheck():
    inputs = [randn(2, c, 3, 2, seed=12 + i, requires_grad=True)
              for i, c in enumerate((2, 3, 2, 3))]
    assert torch.autograd.gradcheck(fsp_pair_loss, inputs)

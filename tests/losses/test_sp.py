import pytest
import torch

from kdfast import backends
from kdfast.functional import sp_loss
from kdfast.reference.sp import similarity_loss, similarity_matrix
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(reduction):
    s, t = randn(4, 3, 5, 5, seed=0), randn(4, 6, 2, 3, seed=1)
    rows = similarity_loss(s, t)
    expected = {"mean": (similarity_matrix(t) - similarity_matrix(s)).pow(2).sum() / 16,
                "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(sp_loss(s, t, reduction=reduction), expected)


@pytest.mark.parametrize("s_shape,t_shape", [
    ((1, 3, 2, 2), (1, 5)),
    ((3, 7), (3, 2, 3, 5)),
    ((5, 2, 3, 3), (5, 4, 1, 1)),
])
def test_shapes_only_batch_must_match(s_shape, t_shape):
    s = randn(*s_shape, seed=2, requires_grad=True)
    t = randn(*t_shape, seed=3)
    out = sp_loss(s, t, reduction="none")
    assert out.shape == (s_shape[0],)
    (g,) = grads(out.sum(), [s], grad_output=2.0)
    (g_ref,) = grads(similarity_loss(s, t).sum(), [s], grad_output=2.0)
    assert_rel_close(g, g_ref, 1e-12)


def test_scale_invariance_through_the_public_function():
    s, t = randn(4, 8, seed=4), randn(4, 3, 2, 2, seed=5)
    torch.testing.assert_close(sp_loss(7.0 * s, 0.1 * t), sp_loss(s, t))


def test_dispatches_through_the_similarity_core():
    assert backends.choose("similarity", "reference", randn(2, 3)).fn.__wrapped__ is similarity_loss


def test_gradcheck():
    s = randn(3, 2, 2, 2, seed=8, requires_grad=True)
    t = randn(3, 4, seed=9, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sp_loss(a, b, reduction="sum"), (s, t))

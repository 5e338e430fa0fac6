import pytest
import torch

from kdfast.functional import rkd_loss
from kdfast.reference.rkd import rkd_loss as reference_rkd
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn, reduced


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_reference(reduction):
    s = randn(5, 3, 2, 2, seed=0, requires_grad=True)
    t = randn(5, 7, seed=1)
    per_anchor = reference_rkd(s, t, 25.0, 50.0)
    expected = reduced(per_anchor, reduction)
    out = rkd_loss(s, t, reduction=reduction)
    torch.testing.assert_close(out, expected)
    (g,) = grads(out.sum(), [s], grad_output=0.7)
    (g_ref,) = grads(expected.sum(), [s], grad_output=0.7)
    assert_rel_close(g, g_ref, 1e-12)


def test_weights_are_linear():
    s, t = randn(4, 5, seed=2), randn(4, 3, seed=3)
    distance = rkd_loss(s, t, distance_weight=1.0, angle_weight=0.0)
    angle = rkd_loss(s, t, distance_weight=0.0, angle_weight=1.0)
    torch.testing.assert_close(rkd_loss(s, t), 25.0 * distance + 50.0 * angle)
    assert distance > 0 and angle > 0


def test_feature_maps_are_flattened_per_sample():
    s, t = randn(4, 2, 3, 3, seed=4), randn(4, 6, seed=5)
    torch.testing.assert_close(rkd_loss(s, t), rkd_loss(s.flatten(1), t))
    cl = s.to(memory_format=torch.channels_last)
    torch.testing.assert_close(rkd_loss(cl, t), rkd_loss(s, t))


def test_needs_two_samples():
    s = randn(1, 4)
    with pytest.raises(ValueError, match="batch size of at least 2.*drop_last"):
        rkd_loss(s, s)


def test_identical_inputs_give_zero():
    s = randn(3, 4, seed=10)
    assert rkd_loss(s, s.clone()) == 0


def test_identical_rows_through_the_public_function():
    s = randn(4, 6, seed=6)
    s[2] = s[0]
    s.requires_grad_()
    (g,) = grads(rkd_loss(s, randn(4, 5, seed=7)), [s])
    assert torch.isfinite(g).all() and g.abs().max() < 100


def test_gradcheck():
    s = randn(4, 2, 1, 2, seed=8, requires_grad=True)
    t = randn(4, 3, seed=9)
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, t, reduction="sum"), (s,))

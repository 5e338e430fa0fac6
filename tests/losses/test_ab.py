import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.functional import ab_loss
from kdfast.reference.ab import ab_loss as reference_ab
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_match_reference(reduction):
    s, t = randn(3, 4, 5, 6, seed=0), randn(3, 4, 5, 6, seed=1)
    per_sample = reference_ab(s, t, 0.5)
    expected = {"mean": per_sample.sum() / 3, "sum": per_sample.sum(), "none": per_sample}
    torch.testing.assert_close(ab_loss(s, t, margin=0.5, reduction=reduction),
                               expected[reduction])


def test_pools_the_larger_map_and_passes_gradient():
    s = randn(2, 3, 8, 6, seed=2, requires_grad=True)
    t = randn(2, 3, 4, 3, seed=3)
    out = ab_loss(s, t)
    expected = reference_ab(F.avg_pool2d(s, 2), t, 1.0).mean()
    torch.testing.assert_close(out, expected)
    (g,) = grads(out, [s], grad_output=0.3)
    (g_ref,) = grads(expected, [s], grad_output=0.3)
    assert_rel_close(g, g_ref, 1e-12)


def test_connector_is_applied_before_the_channel_check():
    conv = nn.Conv2d(3, 5, 1).double()
    s, t = randn(2, 3, 4, 4, seed=6), randn(2, 5, 4, 4, seed=7)
    torch.testing.assert_close(ab_loss(s, t, connector=conv), reference_ab(conv(s), t, 1.0).mean())


def test_module_builds_a_connector_only_when_channels_differ():
    loss = kdfast.ABLoss(margin=2.0, student_channels=3, teacher_channels=5)
    assert isinstance(loss.connector[0], nn.Conv2d) and loss.connector[0].kernel_size == (1, 1)
    assert len(loss.connector) == 2  # conv + BN, no ReLU on pre-activations
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    out = loss(s, t)
    torch.testing.assert_close(out, ab_loss(s, t, margin=2.0, connector=loss.connector))
    out.backward()
    assert all(p.grad is not None for p in loss.parameters())
    assert kdfast.ABLoss(student_channels=4, teacher_channels=4).connector is None
    assert kdfast.ABLoss().connector is None
    assert "margin=2.0" in repr(loss)


def test_module_needs_both_channel_counts_or_neither():
    with pytest.raises(ValueError, match="both student_channels and teacher_channels"):
        kdfast.ABLoss(student_channels=3)


def test_gradcheck():
    s = randn(2, 3, 4, 2, seed=8, requires_grad=True)
    t = randn(2, 3, 2, 2, seed=9)
    assert torch.autograd.gradcheck(lambda x: ab_loss(x, t, margin=0.7), (s,))

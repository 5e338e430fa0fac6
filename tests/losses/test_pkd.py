import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.functional import pkd_loss
from kdfast.reference.pkd import pkd_loss as reference_pkd
from tests.helpers import randn


def test_function_is_the_reference_times_the_weight():
    s, t = randn(2, 4, 3, 5, seed=0), randn(2, 4, 3, 5, seed=1)
    torch.testing.assert_close(pkd_loss(s, t, reduction="none"), reference_pkd(s, t))
    torch.testing.assert_close(pkd_loss(s, t, loss_weight=2.5), 2.5 * reference_pkd(s, t).mean())


@pytest.mark.parametrize("resize_student", [True, False])
def test_resizes_bilinearly_like_mmrazor(resize_student):
    s, t = randn(2, 4, 4, 6, seed=2), randn(2, 4, 8, 12, seed=3)
    if resize_student:
        expected = reference_pkd(F.interpolate(s, (8, 12), mode="bilinear"), t).mean()
    else:
        expected = reference_pkd(s, F.interpolate(t, (4, 6), mode="bilinear")).mean()
    torch.testing.assert_close(pkd_loss(s, t, resize_student=resize_student), expected)
    torch.testing.assert_close(kdfast.PKDLoss(resize_student=resize_student)(s, t), expected)


def test_gradients_reach_both_inputs_and_are_finite():
    s = randn(2, 3, 4, 4, seed=4, requires_grad=True)
    t = randn(2, 3, 4, 4, seed=5, requires_grad=True)
    pkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert s.grad.abs().sum() > 0

import pytest
import torch

import kdfast
from kdfast.functional import kd_loss
from kdfast.reference.kd import kd_loss as kd_reference
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn, reduced


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 7), (1, 2), (5, 1000)])
def test_kd_loss_matches_reference(reduction, shape):
    s = randn(*shape, seed=0, requires_grad=True)
    t = randn(*shape, seed=1)
    out = kd_loss(s, t, temperature=3.0, reduction=reduction)
    per_sample = kd_reference(s, t, 3.0)
    expected = reduced(per_sample, reduction)
    assert_rel_close(out, expected, 1e-14, "value")
    assert_rel_close(grads(out.sum(), s, 1.7)[0], grads(expected.sum(), s, 1.7)[0],
                     1e-14, "gradient")


def test_default_temperature_is_four():
    s, t = randn(2, 5, seed=2), randn(2, 5, seed=3)
    torch.testing.assert_close(kd_loss(s, t), kd_reference(s, t, 4.0).mean())


def test_non_contiguous_and_float32_inputs():
    s = randn(7, 4, seed=4, dtype=torch.float32).t()  # (4, 7), non-contiguous
    t = randn(4, 7, seed=5, dtype=torch.float32)
    assert not s.is_contiguous()
    ref = kd_reference(s.double().contiguous(), t.double(), 4.0).mean()
    assert_rel_close(kd_loss(s, t), ref, 1e-6)


def test_teacher_with_and_without_requires_grad():
    s = randn(3, 6, seed=6, requires_grad=True)
    frozen = randn(3, 6, seed=7)
    g_frozen = torch.autograd.grad(kd_loss(s, frozen), s)[0]
    live = frozen.clone().requires_grad_()
    g_s, g_t = torch.autograd.grad(kd_loss(s, live), (s, live))
    torch.testing.assert_close(g_s, g_frozen)
    assert g_t.abs().sum() > 0  # the teacher is not detached by kd_loss
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, temperature=2.0), (s, live))




def test_module_temperature_is_an_attribute_and_a_schedule_takes_effect():
    s, t = randn(4, 6, seed=2), randn(4, 6, seed=3)
    criterion = kdfast.KDLoss(temperature=4)
    assert criterion.temperature == 4
    criterion.temperature = 1.0
    torch.testing.assert_close(criterion(s, t), kd_loss(s, t, temperature=1.0))
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        criterion.temperature = float("inf")
    assert criterion.temperature == 1.0
    assert "temperature=1.0" in repr(criterion)

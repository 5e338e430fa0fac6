import pytest
import torch

import kdfast
from kdfast.functional import dkd_loss, kd_loss
from kdfast.reference.dkd import dkd_loss as dkd_reference
from tests.helpers import REDUCTIONS, assert_matches_reference, assert_rel_close, randn
from tests.reference.test_dkd import mdistiller_dkd

LABELS = torch.tensor([0, 6, 3, 3, 9])


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_the_reference(backend, dtype):
    s = randn(5, 10, seed=0).to(dtype).requires_grad_()
    t = (randn(5, 10, seed=1) * 3).to(dtype).requires_grad_()
    assert_matches_reference(
        lambda a, b: dkd_loss(a, b, LABELS, reduction="none", backend=backend),
        lambda a, b: dkd_reference(a, b, LABELS), (s, t))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_agrees_with_mdistillers_minus_1000_trick(backend):
    # The gold column at -inf (exact) against mdistiller's z/T - 1000 at ordinary logits.
    s = randn(5, 10, seed=2, dtype=torch.float32, requires_grad=True)
    t = randn(5, 10, seed=3, dtype=torch.float32) * 4
    ours = dkd_loss(s, t, LABELS, reduction="none", backend=backend)
    theirs = mdistiller_dkd(s, t, LABELS, 1.0, 8.0, 4.0)
    assert_rel_close(ours, theirs, 1e-6, "loss")
    assert_rel_close(torch.autograd.grad(ours.sum(), s)[0],
                     torch.autograd.grad(theirs.sum(), s)[0], 1e-6, "gradient")


def test_defaults_are_mdistillers_and_the_warmup_factor_scales():
    s, t = randn(5, 10, seed=4), randn(5, 10, seed=5)
    expected = dkd_reference(s, t, LABELS, 4.0, 1.0, 8.0).mean()
    torch.testing.assert_close(dkd_loss(s, t, LABELS), expected)
    torch.testing.assert_close(dkd_loss(s, t, LABELS, warmup_factor=0.25), 0.25 * expected)
    assert dkd_loss(s, t, LABELS, warmup_factor=0.0) == 0


def test_two_classes_is_kd():
    s, t = randn(4, 2, seed=6), randn(4, 2, seed=7)
    y = torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(dkd_loss(s, t, y), kd_loss(s, t))


def test_rejects_one_class_and_bad_targets():
    s, t = randn(3, 1, seed=8), randn(3, 1, seed=9)
    with pytest.raises(ValueError, match="student_logits has 1 class.*at least 2"):
        dkd_loss(s, t, torch.zeros(3, dtype=torch.long))
    s, t = randn(3, 4, seed=8), randn(3, 4, seed=9)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\]"):
        dkd_loss(s, t, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        dkd_loss(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        dkd_loss(s, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_warmup_factor_is_an_attribute(reduction):
    s, t = randn(5, 10, seed=10), randn(5, 10, seed=11)
    criterion = kdfast.DKDLoss(reduction=reduction)
    criterion.warmup_factor = min(3 / 20, 1.0)
    torch.testing.assert_close(criterion(s, t, LABELS),
                               dkd_loss(s, t, LABELS, warmup_factor=0.15, reduction=reduction))

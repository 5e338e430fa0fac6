"""The public losses with ``backend="triton"`` against ``backend="reference"``."""

import pytest
import torch

from kdfast.functional import at_loss, fsp_loss, nst_loss, sp_loss
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.triton_interpret


def compare(loss_fn, inputs, grad_output=2.5, **options):
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        value = loss_fn(*leaves, backend=backend, **options)
        grads = torch.autograd.grad(value * grad_output, [x for x in leaves if x is not None])
        results.append((value, grads))
    (value, grads), (ref_value, ref_grads) = results
    assert_rel_close(value, ref_value, 1e-12, "value")
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_rel_close(grad, ref_grad, 1e-12, "gradient")


def test_at_loss(device):
    compare(at_loss, [randn(2, 3, 8, 6).to(device), randn(2, 5, 4, 3).to(device)], p=3.0)


def test_sp_loss(device):
    compare(sp_loss, [randn(5, 3, 4, 4).to(device), randn(5, 7, 2, 2).to(device)],
            reduction="sum")


def test_nst_loss(device):
    compare(nst_loss, [randn(2, 4, 6, 6).to(device), randn(2, 7, 3, 3).to(device)],
            kernel="rbf", sigma2="mean", unbiased=True)


def test_fsp_loss(device):
    sa, sb, ta, tb = (randn(2, c, h, h).to(device) for c, h in [(3, 4), (5, 4), (3, 2), (5, 2)])

    def loss(sa, sb, ta, tb, **options):
        return fsp_loss([(sa, sb)], [(ta, tb)], **options)

    compare(loss, [sa, sb, ta, tb])

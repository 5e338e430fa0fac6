"""The public losses with ``backend="triton"`` against ``backend="reference"`` (same dtype)."""

import pytest
import torch

from kdfast.functional import at_loss, fsp_loss, nst_loss, sp_loss
from tests.helpers import assert_rel_close

pytestmark = pytest.mark.triton_interpret


def compare(loss_fn, inputs, tol, grad_output=2.5, **options):
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        value = loss_fn(*leaves, backend=backend, **options)
        grads = torch.autograd.grad(value * grad_output, [x for x in leaves if x is not None])
        results.append((value, grads))
    (value, grads), (ref_value, ref_grads) = results
    assert_rel_close(value, ref_value, tol, "value")
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_rel_close(grad, ref_grad, tol, "gradient")


def test_at_loss(precise):
    compare(at_loss, [precise.randn(2, 3, 8, 6), precise.randn(2, 5, 4, 3)], precise.tol, p=3.0)


def test_sp_loss(precise):
    compare(sp_loss, [precise.randn(5, 3, 4, 4), precise.randn(5, 7, 2, 2)], precise.tol,
            reduction="sum")


def test_nst_loss(precise):
    compare(nst_loss, [precise.randn(2, 4, 6, 6), precise.randn(2, 7, 3, 3)], precise.tol,
            kernel="rbf", sigma2="mean", unbiased=True)


def test_fsp_loss(precise):
    sa, sb, ta, tb = (precise.randn(2, c, h, h) for c, h in [(3, 4), (5, 4), (3, 2), (5, 2)])

    def loss(sa, sb, ta, tb, **options):
        return fsp_loss([(sa, sb)], [(ta, tb)], **options)

    compare(loss, [sa, sb, ta, tb], precise.tol)

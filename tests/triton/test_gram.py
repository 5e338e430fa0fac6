"""Triton SP ("similarity") core: a batch of one gives 0 with a zero gradient. Values and
gradients of the SP and FSP cores over shapes, layouts, dtypes and determinism are in
tests/test_parity.py."""

import pytest
import torch

from kdfast import backends

pytestmark = pytest.mark.triton_interpret


def triton_core(core, *tensors):
    return backends.choose(core, "triton", *tensors).fn


def similarity(s, t):
    return triton_core("similarity", s, t)(s, t)


def fsp(sa, sb, ta, tb):
    return triton_core("fsp", sa, sb, ta, tb)(sa, sb, ta, tb)


def test_similarity_batch_of_one_is_zero_with_zero_gradient(precise):
    s = precise.randn(1, 3, 4, 4).requires_grad_(True)
    out = similarity(s, precise.randn(1, 2, 4, 4))
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert out.abs().max() < precise.tol and grad.abs().max() < precise.tol



"""Triton SP ("similarity") and FSP ("fsp") cores against the references."""

import pytest
import torch

from kdfast import backends
from kdfast.reference import fsp as fsp_reference
from kdfast.reference import sp as sp_reference
from tests.helpers import randn
from tests.triton.parity import check_parity

pytestmark = pytest.mark.triton_interpret


def triton_core(core, *tensors):
    return backends.choose(core, "triton", *tensors).fn


def similarity(s, t):
    return triton_core("similarity", s, t)(s, t)


def fsp(sa, sb, ta, tb):
    return triton_core("fsp", sa, sb, ta, tb)(sa, sb, ta, tb)


@pytest.mark.parametrize("s_shape,t_shape", [
    ((5, 3, 4, 5), (5, 7, 2, 3)),      # odd B, D_s != D_t
    ((19, 3, 3, 3), (19, 11)),         # B above one 16-block, 2-D teacher
    ((2, 1, 1, 1), (2, 40, 1, 1)),     # D = 1
])
def test_similarity_precise(precise, s_shape, t_shape):
    s, t = precise.randn(*s_shape), precise.randn(*t_shape)
    check_parity(similarity, sp_reference.similarity_loss, [s, t], precise.tol)


def test_similarity_layouts_and_teacher_without_grad(precise):
    s = precise.randn(6, 5, 3, 7).to(memory_format=torch.channels_last)
    t = precise.randn(6, 4, 9, 5).transpose(2, 3)  # neither contiguous nor channels_last
    check_parity(similarity, sp_reference.similarity_loss, [s, t], precise.tol, grad_inputs=[0])


def test_similarity_batch_of_one_is_zero_with_zero_gradient(precise):
    s = precise.randn(1, 3, 4, 4).requires_grad_(True)
    out = similarity(s, precise.randn(1, 2, 4, 4))
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert out.abs().max() < precise.tol and grad.abs().max() < precise.tol


def test_similarity_all_zero_sample_follows_eps(precise):
    s, t = precise.randn(4, 3, 2, 5), precise.randn(4, 6, 2, 5)
    s[1] = 0
    check_parity(similarity, sp_reference.similarity_loss, [s, t], precise.tol)


def test_similarity_low_precision(device, low_precision):
    dtype, tol = low_precision
    s, t = randn(7, 5, 3, 3).to(device, dtype), randn(7, 6, 3, 3).to(device, dtype)
    out = check_parity(similarity, sp_reference.similarity_loss, [s, t], tol, 5 * tol)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("ca,cb,s_hw,t_hw", [
    (3, 17, (5, 7), (4, 3)),   # odd channels, C_a != C_b, student HW != teacher HW
    (1, 1, (1, 1), (2, 2)),
    (18, 5, (3, 6), (3, 6)),   # C_a above one 16-block
])
def test_fsp_precise(precise, ca, cb, s_hw, t_hw):
    inputs = [randn(2, ca, *s_hw), randn(2, cb, *s_hw), randn(2, ca, *t_hw), randn(2, cb, *t_hw)]
    inputs = [x.to(precise.device, precise.dtype) for x in inputs]
    check_parity(fsp, fsp_reference.fsp_pair_loss, inputs, precise.tol)


def test_fsp_layouts_batch_one_and_teacher_without_grad(precise):
    sa = precise.randn(1, 4, 5, 6).to(memory_format=torch.channels_last)
    sb = precise.randn(1, 6, 6, 5).transpose(2, 3)
    ta, tb = precise.randn(1, 4, 3, 3), precise.randn(1, 12, 3, 3)[:, ::2]
    check_parity(fsp, fsp_reference.fsp_pair_loss, [sa, sb, ta, tb], precise.tol,
                 grad_inputs=[0, 1])


def test_fsp_zero_channel(precise):
    inputs = [randn(2, 3, 4, 4), randn(2, 5, 4, 4), randn(2, 3, 2, 2), randn(2, 5, 2, 2)]
    inputs[0][0, 1] = 0
    inputs = [x.to(precise.device, precise.dtype) for x in inputs]
    check_parity(fsp, fsp_reference.fsp_pair_loss, inputs, precise.tol)


def test_fsp_low_precision(device, low_precision):
    dtype, tol = low_precision
    inputs = [randn(2, 5, 4, 4), randn(2, 7, 4, 4), randn(2, 5, 3, 3), randn(2, 7, 3, 3)]
    out = check_parity(fsp, fsp_reference.fsp_pair_loss, [x.to(device, dtype) for x in inputs],
                       tol, 5 * tol)
    assert out.dtype == torch.float32


def test_gram_cores_are_deterministic(device):
    s, t = randn(9, 5, 4, 4, dtype=torch.float32).to(device), randn(9, 3, 4, 4).float().to(device)
    assert torch.equal(similarity(s, t), similarity(s, t))
    inputs = [randn(2, c, 4, 4, dtype=torch.float32).to(device) for c in (3, 5, 3, 5)]
    assert torch.equal(fsp(*inputs), fsp(*inputs))

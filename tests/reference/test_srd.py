import math

import pytest
import torch

from kdfast.reference.srd import srd_feature_term, srd_loss
from tests.helpers import assert_rel_close, randn


def test_by_hand():
    f_t = randn(2, 2, seed=0)
    z = randn(2, 3, seed=1)
    # |f_s - f_t| = 1 on 4 entries: 2 log 4; equal logits: KL 0
    torch.testing.assert_close(srd_loss(f_t + 1, f_t, z, z),
                               torch.full((2,), 2 * math.log(4), dtype=torch.float64))
    assert srd_feature_term(f_t - 2, f_t, exponent=3.0) == pytest.approx(2 * math.log(32))


def test_kl_has_no_temperature_squared_factor():
    f = randn(3, 4, seed=2)
    s, t = randn(3, 5, seed=3), randn(3, 5, seed=4)
    p_t = torch.softmax(t / 2, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 2, dim=1))).sum(dim=1)
    torch.testing.assert_close(srd_loss(f + 1, f, s, t, temperature=2.0),
                               kl + 2 * math.log(12))


def test_gradcheck():
    f_s, f_t = randn(3, 4, seed=5, requires_grad=True), randn(3, 4, seed=6)
    z_s, z_t = randn(3, 5, seed=7, requires_grad=True), randn(3, 5, seed=8)
    assert torch.autograd.gradcheck(lambda a, b: srd_loss(a, f_t, b, z_t, 2.0, 3.0),
                                    (f_s, z_s))


@pytest.mark.parametrize("exponent,temperature", [(1.0, 1.0), (4.0, 1.0), (2.0, 3.0)])
def test_equals_torchdistill_srd(exponent, temperature):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level",
                                    reason="torchdistill (peer library) not installed")
    f_s, f_t = randn(4, 6, seed=9), randn(4, 6, seed=10)
    z_s, z_t = randn(4, 5, seed=11), randn(4, 5, seed=12)
    peer = mid_level.SRDLoss("f", "output", "f", "output", "z", "output", "z", "output",
                             exponent=exponent, temperature=temperature)
    expected = peer({"f": {"output": f_s}, "z": {"output": z_s}},
                    {"f": {"output": f_t}, "z": {"output": z_t}})
    assert_rel_close(srd_loss(f_s, f_t, z_s, z_t, exponent, temperature).mean(), expected,
                     1e-13)

import pytest
import torch
import torch.nn.functional as F

from kdfast import backends
from kdfast.functional import fsp_loss
from kdfast.reference.fsp import fsp_pair_loss
from tests.helpers import REDUCTIONS, assert_rel_close, grads, randn, reduced


def features(batch, channels_and_sizes, seed, requires_grad=False):
    return [randn(batch, c, h, w, seed=seed + i, requires_grad=requires_grad)
            for i, (c, h, w) in enumerate(channels_and_sizes)]


def consecutive(feats):
    return list(zip(feats, feats[1:], strict=False))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pairs_are_pooled_and_summed(reduction):
    s = features(3, [(2, 8, 8), (3, 4, 4), (5, 2, 2)], seed=0, requires_grad=True)
    t = features(3, [(2, 4, 4), (3, 4, 4), (5, 4, 4)], seed=10)  # teacher sizes differ
    # student pairs: s[0] (8x8) pooled to s[1]'s 4x4, then s[1] (4x4) pooled to s[2]'s 2x2
    per_sample = (fsp_pair_loss(F.avg_pool2d(s[0], 2), s[1], t[0], t[1])
                  + fsp_pair_loss(F.avg_pool2d(s[1], 2), s[2], t[1], t[2]))
    expected = reduced(per_sample, reduction)
    out = fsp_loss(consecutive(s), consecutive(t), reduction=reduction)
    assert_rel_close(out, expected, 1e-12)
    g = grads(out.sum(), s, grad_output=1.3)
    g_ref = grads(expected.sum(), s, grad_output=1.3)
    for a, b in zip(g, g_ref, strict=True):
        assert_rel_close(a, b, 1e-12)


def test_default_is_mean_over_b_ca_cb_per_pair():
    sa, sb, ta, tb = features(2, [(3, 4, 4), (2, 4, 4), (3, 4, 4), (2, 4, 4)], seed=20)
    g_s = torch.einsum("bihw,bjhw->bij", sa, sb) / 16
    g_t = torch.einsum("bihw,bjhw->bij", ta, tb) / 16
    torch.testing.assert_close(fsp_loss([(sa, sb)], [(ta, tb)]), (g_s - g_t).pow(2).mean())


def test_dispatches_through_the_fsp_core():
    x = randn(2, 3, 4, 4)
    assert backends.choose("fsp", "reference", x, x, x, x).fn.__wrapped__ is fsp_pair_loss


def test_bad_pairs():
    a, b = randn(2, 3, 4, 4), randn(2, 5, 2, 2)
    ok = [(a, b)]
    with pytest.raises(TypeError, match="student_pairs must be a list"):
        fsp_loss(a, ok)
    with pytest.raises(ValueError, match="teacher_pairs is empty"):
        fsp_loss(ok, [])
    with pytest.raises(TypeError, match=r"student_pairs\[0\] must be a pair"):
        fsp_loss([(a, b, a)], ok)
    with pytest.raises(ValueError, match="1 pairs but teacher_pairs has 2"):
        fsp_loss(ok, ok + ok)
    other = [(randn(3, 3, 4, 4), randn(3, 5, 2, 2))]
    with pytest.raises(ValueError, match=r"student_pairs\[0\]\[0\] and student_pairs\[1\]\[0\] "
                                         "must have the same batch size"):
        fsp_loss(ok + other, ok + other)


def test_gradcheck():
    s = features(2, [(2, 4, 2), (3, 2, 1)], seed=50, requires_grad=True)
    t = features(2, [(2, 2, 2), (3, 2, 2)], seed=60, requires_grad=True)
    def loss(s0, s1, t0, t1):
        return fsp_loss([(s0, s1)], [(t0, t1)], reduction="sum")
    assert torch.autograd.gradcheck(loss, (*s, *t))

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.functional import hcl_loss
from kdfast.reference.reviewkd import hierarchical_context_loss, stage_context_loss
from tests.helpers import randn


def authors_hcl(student_feats, teacher_feats):
    """An independent transcription of the authors' ``hcl`` (global means, for comparison)."""
    total = 0.0
    for s, t in zip(student_feats, teacher_feats, strict=True):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level),
                                              F.adaptive_avg_pool2d(t, level))
            weights += weight
        total = total + loss / weights
    return total


def test_a_one_pixel_map_is_its_squared_error():
    s = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    torch.testing.assert_close(stage_context_loss(s, torch.zeros_like(s)),
                               torch.tensor([4.0], dtype=torch.float64))


def test_hand_computed_two_by_two():
    # full map: (1 + 9 + 0 + 0) / 4 = 2.5; pooled to 1x1: mean 1, squared 1, weight 1/2;
    # (2.5 + 0.5) / 1.5 = 2
    s = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(stage_context_loss(s, torch.zeros_like(s)),
                               torch.tensor([2.0], dtype=torch.float64))


def test_constant_difference_is_the_same_at_every_level():
    s = randn(2, 3, 8, 8, seed=0)
    torch.testing.assert_close(stage_context_loss(s + 0.5, s),
                               torch.full((2,), 0.25, dtype=torch.float64))


def test_matches_the_authors_formula_over_stages():
    s = [randn(3, 4, 8, 8, seed=1), randn(3, 5, 4, 4, seed=2), randn(3, 6, 1, 1, seed=3)]
    t = [randn(3, 4, 8, 8, seed=4), randn(3, 5, 4, 4, seed=5), randn(3, 6, 1, 1, seed=6)]
    per_sample = hierarchical_context_loss(s, t)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample.mean(), authors_hcl(s, t))
    torch.testing.assert_close(hcl_loss(s, t), authors_hcl(s, t))


def test_gradcheck():
    s = randn(2, 2, 5, 5, seed=7, requires_grad=True)
    t = randn(2, 2, 5, 5, seed=8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hierarchical_context_loss([a], [b]), (s, t))
    assert torch.autograd.gradgradcheck(lambda a, b: hierarchical_context_loss([a], [b]),
                                        (s, t))


def test_errors_name_the_stage():
    s, t = [randn(2, 3, 4, 4)], [randn(2, 4, 4, 4)]
    with pytest.raises(ValueError, match=r"student_feats\[0\] and teacher_feats\[0\] must "
                                         "have the same shape"):
        hcl_loss(s, t)
    with pytest.raises(ValueError, match="1 stages but teacher_feats has 2"):
        hcl_loss(s, t + t)
    with pytest.raises(TypeError, match="student_feats must be a list"):
        hcl_loss(s[0], t)
    with pytest.raises(ValueError, match=r"levels\[1\] must be an int >= 1"):
        hcl_loss(s, s, levels=(4, 0))


def test_fusion_stage_by_hand():
    torch.manual_seed(0)
    fusion = kdfast.AttentionBasedFusion(3, 4, 5, fuse=True).double().eval()
    x, residual = randn(2, 3, 4, 4, seed=9), randn(2, 4, 2, 2, seed=10)
    out, fused = fusion(x, residual)
    reduced = fusion.reduce(x)
    up = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
    weights = fusion.attention(torch.cat([reduced, up], dim=1))
    torch.testing.assert_close(fused, reduced * weights[:, 0:1] + up * weights[:, 1:2])
    torch.testing.assert_close(out, fusion.output(fused))
    out, fused = fusion(x, residual, out_size=8)
    assert out.shape == (2, 5, 8, 8) and fused.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="needs the residual"):
        fusion(x)


def test_review_path_shapes_and_order():
    torch.manual_seed(0)
    review = kdfast.ReviewKD([4, 6, 8], [5, 7, 9], out_shapes=[8, 4, 1]).double()
    assert review.fusions[0].reduce[0].out_channels == 8  # min(512, in_channels[-1])
    assert review.fusions[-1].attention is None
    s = [randn(2, 4, 8, 8, seed=1), randn(2, 6, 4, 4, seed=2), randn(2, 8, 2, 2, seed=3)]
    out = review(s)
    assert [tuple(x.shape) for x in out] == [(2, 5, 8, 8), (2, 7, 4, 4), (2, 9, 1, 1)]
    # the deepest stage alone, then each shallower one fused with the deeper residual
    deep_out, residual = review.fusions[2](s[2], None, 1)
    mid_out, residual = review.fusions[1](s[1], residual, 4)
    top_out, _ = review.fusions[0](s[0], residual, 8)
    for got, want in zip(out, (top_out, mid_out, deep_out), strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="2 stages but this ReviewKD was built for 3"):
        review(s[:2])


def test_loss_module_trains_the_review_path():
    torch.manual_seed(0)
    loss = kdfast.ReviewKDLoss([4, 6], [5, 7]).double()
    s = [randn(2, 4, 8, 8, seed=1), randn(2, 6, 4, 4, seed=2)]
    t = [randn(2, 5, 8, 8, seed=3), randn(2, 7, 4, 4, seed=4)]
    value = loss(s, t)
    torch.testing.assert_close(value, hcl_loss(loss.review(s), t))
    value.backward()
    assert all(p.grad is not None for p in loss.review.fusions[0].parameters())
    assert kdfast.ReviewKDLoss(levels=(2, 1), reduction="sum")(t, t) == 0

import pytest
import torch

import kdfast
from kdfast.functional import hcl_loss
from tests.helpers import docstring_example_loss, randn, run_docstring_example


def stages(seed=0):
    return [randn(2, 3, 8, 8, seed=seed), randn(2, 4, 4, 4, seed=seed + 1)]


@pytest.mark.parametrize("example", [hcl_loss, kdfast.ReviewKDLoss])
def test_docstring_example_runs(example):
    assert docstring_example_loss(example) > 0


def test_review_path_example_runs():
    assert run_docstring_example(kdfast.ReviewKD) == [32, 64, 128]


def test_without_levels_each_stage_is_its_mean_squared_error():
    s, t = stages(0), stages(2)
    expected = sum(((a - b) ** 2).flatten(1).mean(1) for a, b in zip(s, t, strict=True))
    torch.testing.assert_close(hcl_loss(s, t, levels=(), reduction="none"), expected)


def test_reductions_act_on_the_per_sample_losses():
    s, t = stages(4), stages(6)
    rows = hcl_loss(s, t, reduction="none")
    assert rows.shape == (2,)
    torch.testing.assert_close(hcl_loss(s, t), rows.mean())
    torch.testing.assert_close(hcl_loss(s, t, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdfast.ReviewKDLoss(levels=(2, 1), reduction="none")(s, t),
                               hcl_loss(s, t, levels=(2, 1), reduction="none"))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_no_fused_backend(backend):
    s, t = stages(8), stages(10)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run hcl"):
        hcl_loss(s, t, backend=backend)
    torch.testing.assert_close(kdfast.ReviewKDLoss(backend="reference")(s, t), hcl_loss(s, t))


def test_errors_name_the_stage_and_the_fix():
    s, t = stages(12), stages(14)
    with pytest.raises(ValueError, match="student_feats has 2 stages but teacher_feats has 1"):
        hcl_loss(s, t[:1])
    with pytest.raises(TypeError, match="student_feats must be a list of"):
        hcl_loss(s[0], t)
    with pytest.raises(ValueError, match="student_feats is an empty list"):
        hcl_loss([], t)
    with pytest.raises(ValueError, match="pass both in_channels and out_channels"):
        kdfast.ReviewKDLoss([3, 4])
    with pytest.raises(ValueError, match="student_feats has 1 stages but this ReviewKD was "
                                         "built for 2"):
        kdfast.ReviewKDLoss([3, 4], [3, 4]).double()(s[:1], t[:1])
    with pytest.raises(ValueError, match=r"out_shapes must have one entry per stage \(2\)"):
        kdfast.ReviewKD([3, 4], [3, 4], out_shapes=[8])

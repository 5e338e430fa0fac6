import pytest
import torch

from kdfast.functional import dist_loss
from kdfast.reference.dist import dist_loss as dist_reference
from tests.helpers import assert_matches_reference, randn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_matches_the_reference(dtype):
    s = randn(5, 10, seed=0).to(dtype).requires_grad_()
    t = (randn(5, 10, seed=1) * 3).to(dtype).requires_grad_()
    assert_matches_reference(lambda a, b: dist_loss(a, b, temperature=2.0, reduction="none"),
                             lambda a, b: dist_reference(a, b, 2.0), (s, t))


def test_defaults_are_torchdistills():
    s, t = randn(4, 6, seed=2), randn(4, 6, seed=3)
    torch.testing.assert_close(dist_loss(s, t), dist_reference(s, t, 1.0, 1.0, 1.0, 1e-8).mean())


def test_rejects_a_batch_of_one():
    with pytest.raises(ValueError, match="batch size of at least 2.*drop_last"):
        dist_loss(randn(1, 5, seed=4), randn(1, 5, seed=5))

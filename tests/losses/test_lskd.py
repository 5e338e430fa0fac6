import pytest
import torch

import kdfast
from kdfast.functional import lskd_loss
from kdfast.reference.lskd import lskd_loss as lskd_reference
from tests.helpers import assert_matches_reference, randn


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_backends_match_the_reference(backend, dtype):
    s = (randn(5, 12, seed=0) * 3).to(dtype).requires_grad_()
    t = (randn(5, 12, seed=1) * 5).to(dtype).requires_grad_()
    assert_matches_reference(lambda a, b: lskd_loss(a, b, reduction="none", backend=backend),
                             lambda a, b: lskd_reference(a, b, 2.0), (s, t))


def test_default_temperature_is_two_and_eps_torchdistills():
    s, t = randn(4, 6, seed=2), randn(4, 6, seed=3)
    torch.testing.assert_close(lskd_loss(s, t), lskd_reference(s, t, 2.0, 1e-7).mean())
    assert kdfast.LSKDLoss().temperature == 2.0 and kdfast.LSKDLoss().eps == 1e-7


def test_rejects_one_class():
    with pytest.raises(ValueError, match="student_logits has 1 class.*standard deviation"):
        lskd_loss(randn(3, 1, seed=4), randn(3, 1, seed=5))

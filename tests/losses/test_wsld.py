import pytest
import torch

from kdfast.functional import wsld_loss
from kdfast.reference.wsld import wsld_loss as wsld_reference
from tests.helpers import assert_matches_reference, randn

LABELS = torch.tensor([0, 6, 3, 3, 9])


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_the_reference(backend, dtype):
    s = randn(5, 10, seed=0).to(dtype).requires_grad_()
    t = (randn(5, 10, seed=1) * 3).to(dtype).requires_grad_()
    assert_matches_reference(
        lambda a, b: wsld_loss(a, b, LABELS, temperature=2.0, reduction="none",
                               backend=backend),
        lambda a, b: wsld_reference(a, b, LABELS, 2.0), (s, t))


def test_default_temperature_is_mmrazors():
    s, t = randn(5, 10, seed=2), randn(5, 10, seed=3)
    torch.testing.assert_close(wsld_loss(s, t, LABELS), wsld_reference(s, t, LABELS, 1.0).mean())

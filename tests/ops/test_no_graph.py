"""A native core called where no graph is recorded (grad mode off, or no input requiring
grad) runs its forward operator alone, without the autograd Function: the same values as the
reference, an output with no graph, and (for the cores that keep buffers) nothing kept."""

import pytest
import torch

import kdfast
from kdfast.functional import at_loss, fsp_loss, nst_loss, sp_loss
from tests.helpers import assert_rel_close, randn

pytestmark = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                reason="native extension not built")

# (name, loss(student, teacher, backend)) over (B, C_s, H, W) / (B, C_t, H, W) maps.
LOSSES = {
    "at": lambda s, t, backend: at_loss(s, t, reduction="none", backend=backend),
    "sp": lambda s, t, backend: sp_loss(s, t, reduction="none", backend=backend),
    "fsp": lambda s, t, backend: fsp_loss([(s, s[:, :2])], [(t[:, :3], t[:, 1:3])],
                                          reduction="none", backend=backend),
    "nst-poly": lambda s, t, backend: nst_loss(s, t, kernel="poly", reduction="none",
                                               backend=backend),
    "nst-rbf": lambda s, t, backend: nst_loss(s, t, kernel="rbf", reduction="none",
                                              backend=backend),
    "nst-linear": lambda s, t, backend: nst_loss(s, t, kernel="linear", reduction="none",
                                                 backend=backend),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "frozen_inputs"])
def test_forward_without_graph_matches_reference(name, no_grad):
    loss = LOSSES[name]
    student = randn(3, 3, 5, 4, dtype=torch.float64, requires_grad=no_grad)
    teacher = randn(3, 5, 5, 4, dtype=torch.float64)
    expected = loss(student, teacher, "reference")
    with torch.set_grad_enabled(not no_grad):
        got = loss(student, teacher, "native")
    assert got.grad_fn is None and not got.requires_grad
    assert_rel_close(got, expected, 1e-12, name)
    # The same call with a graph gives the same values.
    if no_grad:
        assert_rel_close(loss(student, teacher, "native"), got, 1e-14, name)

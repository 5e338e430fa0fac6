"""torch.compile(fullgraph=True) parity of the logit losses (docs/design.md, "Testing").

``backend="aot_eager"`` traces the whole graph with Dynamo and AOTAutograd (forward and
backward), which is what fullgraph capture needs, without Inductor's code generation (about
30 s per graph on the 2-core CI machine). gradient_at_loss is not here: it calls
``torch.autograd.grad`` inside the loss, which Dynamo does not trace in one graph.
"""

import pytest
import torch

import kdfast
from kdfast.functional import (
    adversarial_student_loss,
    ban_generation_loss,
    discriminator_loss,
    dml_loss,
    kd_loss,
)
from tests.helpers import randn

LABELS = torch.tensor([0, 3, 1])
torch.manual_seed(0)
DISCRIMINATOR = kdfast.ConditionalDiscriminator(4, hidden=8).double()

LOSSES = {
    "kd": lambda s, t: kd_loss(s, t, temperature=2.0),
    "dml": lambda s, t: dml_loss(s, [t, 2 * t]),
    "ban": lambda s, t: ban_generation_loss(s, t, LABELS, label_weight=0.5),
    "discriminator": lambda s, t: discriminator_loss(DISCRIMINATOR, s, t, LABELS),
    "adversarial_student": lambda s, t: adversarial_student_loss(DISCRIMINATOR, s, t, LABELS),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    loss = LOSSES[name]
    s, t = randn(3, 4, seed=0, requires_grad=True), randn(3, 4, seed=1)
    params = list(DISCRIMINATOR.parameters()) if name == "discriminator" else [s]
    eager = loss(s, t)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(s, t)
    g_compiled = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b)


def test_a_temperature_schedule_on_a_compiled_module_matches_eager():
    """A changed float option recompiles with a symbolic float: its checks must trace."""
    torch._dynamo.reset()
    criterion = kdfast.KDLoss(temperature=4.0)
    compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
    s, t = randn(3, 4, seed=0), randn(3, 4, seed=1)
    for temperature in (4.0, 2.0, 1.0):
        criterion.temperature = temperature
        torch.testing.assert_close(compiled(s, t), kd_loss(s, t, temperature=temperature))

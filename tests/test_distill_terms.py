"""Term options checked at construction, and errors raised inside a term's loss naming the
term and its layers."""

import numpy as np
import pytest
import torch
from torch import nn

import kdfast
from kdfast.distill import Distiller, Term


def two_layer_net(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2, 1))


@pytest.mark.parametrize("weight,error,match", [
    ("2", TypeError, "Term.weight must be a number, got str"),
    (None, TypeError, "Term.weight must be a number, got NoneType"),
    (True, TypeError, "Term.weight must be a number, got bool"),
    (float("inf"), ValueError, "Term.weight must be a finite number, got inf"),
    (float("nan"), ValueError, "Term.weight must be a finite number, got nan"),
])
def test_a_bad_weight_is_rejected_at_construction(weight, error, match):
    with pytest.raises(error, match=match):
        Term(kdfast.ATLoss(), "0", weight=weight)


@pytest.mark.parametrize("weight", [2, np.float32(2.0), np.float64(2.0), 2.0])
def test_any_real_weight_is_accepted_as_a_float(weight):
    term = Term(kdfast.ATLoss(), "0", weight=weight)
    assert term.weight == 2.0 and type(term.weight) is float


def test_an_error_inside_a_term_names_the_term_and_its_layers():
    student, teacher = two_layer_net(3, 0), two_layer_net(5, 1)
    # FSP takes lists of pairs, not two maps: its own TypeError, raised inside the term.
    distiller = Distiller(student, teacher, [
        Term(kdfast.ATLoss(), "0", weight=1.0),
        Term(kdfast.FSPLoss(), "0", "2", name="fsp-misused"),
    ])
    with distiller, pytest.raises(TypeError) as caught:
        distiller(torch.randn(2, 1, 4, 4))
    message = str(caught.value)
    assert message.startswith("in Term 'fsp-misused' (student layer '0', teacher layer '2'")
    assert "student_pairs must be a list of (a, b) feature pairs" in message
    assert isinstance(caught.value.__cause__, TypeError)


def test_an_error_type_that_cannot_be_rebuilt_is_raised_unchanged():
    class Unusual(Exception):
        def __init__(self, code: int, detail: str):
            super().__init__(f"{code}: {detail}")

    class Failing(nn.Module):
        def forward(self, student, teacher):
            raise Unusual(7, "boom")

    net = two_layer_net(2, 0)
    distiller = Distiller(net, two_layer_net(2, 1), [Term(Failing(), "0", name="odd")])
    with distiller, pytest.raises(Unusual, match="7: boom") as caught:
        distiller(torch.randn(1, 1, 4, 4))
    notes = getattr(caught.value, "__notes__", None)
    if hasattr(caught.value, "add_note"):  # Python 3.11+
        assert notes and "in Term 'odd' (student layer '0'" in notes[0]

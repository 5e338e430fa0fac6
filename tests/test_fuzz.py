"""Randomised parity of every registered CPU backend of every loss with the float64 reference
(shapes, layouts, dtypes, options, grad_output: see tests/fuzz_cases.py).

The native backend must run the fused cores (FUSED_CORES); a core with no fast backend runs
the reference in the case's dtype instead, so its cases stay exercised until a fused core
registers and is fuzzed here with no change to this file.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdfast
from kdfast import backends
from tests.fuzz_cases import (
    FUSED_CORES,
    LOSSES,
    assert_case_matches_reference,
    fuzz_cases,
    fuzz_settings,
    fuzzed_backends,
)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
NATIVE_BUILT = kdfast.available_backends()["native"]


def required_backends(loss: str) -> tuple[str, ...]:
    return ("native",) if LOSSES[loss].core in FUSED_CORES else ()


def loss_param(loss: str):
    marks = []
    if required_backends(loss) and not NATIVE_BUILT:
        marks.append(pytest.mark.skip(reason="native extension not built"))
    return pytest.param(loss, marks=marks)


@pytest.mark.parametrize("loss", [loss_param(loss) for loss in LOSSES])
@fuzz_settings(examples=150)
@given(data=st.data())
def test_backends_match_reference(loss, data):
    case = data.draw(fuzz_cases(loss, DTYPES), label="case")
    candidates = [name for name in backends.implementations(case.core) if name != "reference"]
    for backend in fuzzed_backends(case, candidates, required_backends(loss)) or ["reference"]:
        assert_case_matches_reference(case, backend)

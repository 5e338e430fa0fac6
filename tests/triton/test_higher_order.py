"""Second derivatives through the Triton cores (the cases of tests/test_higher_order.py):
gradgradcheck in float64 under the interpreter, and a first-order backward that still runs
the Triton kernel (no reference call) with the gradient a create_graph backward gives."""

import pytest

import kdfast.ops.attention
import kdfast.ops.gram
import kdfast.ops.mmd
from tests.test_higher_order import (
    CASES,
    PARAMS,
    check_first_order_runs_the_fused_kernel,
    check_gradgrad,
    count_calls,
)

pytestmark = pytest.mark.triton_interpret

# Where each Triton Function finds the reference it differentiates, by core.
TRITON_REFERENCES = {"attention_map": (kdfast.ops.attention, "attention_map"),
                     "similarity": (kdfast.ops.gram, "similarity_loss"),
                     "fsp": (kdfast.ops.gram, "fsp_pair_loss"),
                     "channel_mmd": (kdfast.ops.mmd, "channel_mmd")}


@pytest.fixture
def float64_device(device, request):
    """The interpreter, or CUDA for the attention map (the only float64 Triton core there)."""
    name = request.node.callspec.params["name"]
    if device == "cuda" and CASES[name][0] != "attention_map":
        pytest.skip("float64 Gram kernels run only under the interpreter")
    return device


# The interpreter is slow: each case once, with the teacher's gradient where it has one.
@pytest.mark.parametrize("name,teacher_grad", [(name, bool(CASES[name][2])) for name in CASES])
def test_gradgradcheck(name, teacher_grad, float64_device):
    check_gradgrad(name, teacher_grad, "triton", float64_device)


@pytest.mark.parametrize("name,teacher_grad", PARAMS)
def test_first_order_backward_runs_the_triton_kernel(name, teacher_grad, float64_device,
                                                     monkeypatch):
    if name == "mmd-poly2-feature-grams":
        pytest.skip("Triton runs feature_gram_channel_mmd (torch matmuls) there, no kernel "
                    "of its own")
    calls = count_calls(monkeypatch, *TRITON_REFERENCES[CASES[name][0]])
    check_first_order_runs_the_fused_kernel(name, teacher_grad, "triton", calls,
                                            float64_device)

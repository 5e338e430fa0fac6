"""Randomised parity of the Triton backend of every loss with the float64 reference, under
the CPU interpreter (or on a CUDA device): shapes, layouts, dtypes, options, grad_output
(see tests/fuzz_cases.py). A loss whose core has no Triton implementation is skipped."""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from kdfast import backends
from tests.fuzz_cases import (
    LOSSES,
    FuzzCase,
    assert_case_matches_reference,
    fuzz_cases,
    fuzz_settings,
    fuzzed_backends,
)

pytestmark = pytest.mark.triton_interpret

# The interpreter has no bfloat16; on CUDA the Gram kernels take no float64.
DTYPES = {"cpu": (torch.float64, torch.float32, torch.float16),
          "cuda": (torch.float32, torch.float16, torch.bfloat16)}
# Known deviations, each pinned by an xfail(strict=True) test below: drop the entry when it
# is fixed (the xfail then passes and fails the run as a reminder).
LOW_PRECISION_KNOWN_TO_DEVIATE = {"nst_loss": (torch.float16, torch.bfloat16)}


def loss_param(loss: str):
    core = LOSSES[loss].core
    marks = [] if "triton" in backends.implementations(core) else [
        pytest.mark.skip(reason=f"no Triton implementation of the {core!r} core yet")]
    return pytest.param(loss, marks=marks)


def fuzzed_dtypes(loss: str, device: str) -> tuple[torch.dtype, ...]:
    excluded = LOW_PRECISION_KNOWN_TO_DEVIATE.get(loss, ())
    return tuple(dtype for dtype in DTYPES[device] if dtype not in excluded)


@contextlib.contextmanager
def mmd_backward(keep_blocks: bool):
    """The Triton MMD backward that keeps the forward's Gram blocks (``keep_blocks``) or
    recomputes them (what maps this small get by default)."""
    from kdfast.ops import mmd as mmd_ops
    saved = mmd_ops.MMD_RECOMPUTE_MAX_HW
    mmd_ops.MMD_RECOMPUTE_MAX_HW = 0 if keep_blocks else 1 << 30
    try:
        yield
    finally:
        mmd_ops.MMD_RECOMPUTE_MAX_HW = saved


@pytest.mark.parametrize("loss", [loss_param(loss) for loss in LOSSES])
@fuzz_settings(examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_triton_matches_reference(device, loss, data):
    case = data.draw(fuzz_cases(loss, fuzzed_dtypes(loss, device)), label="case")
    keep_blocks = loss == "nst_loss" and data.draw(st.booleans(), label="keep Gram blocks")
    fuzzed_backends(case, ["triton"], ["triton"], device)
    with mmd_backward(keep_blocks):
        assert_case_matches_reference(case, "triton", device)


# Found by test_triton_matches_reference (shrunk): one channel each, x̂ ≈ -ŷ. The gradient
# dX = (Σ_j w_j ŷ_j - c x̂) / |x| cancels, and both backward paths round the kernel weights
# w and the unit rows ŷ to float16 before tl.dot (kdfast/triton/mmd.py, _recompute_block),
# so its relative error is 4.0e-3 (recompute) / 4.6e-3 (kept blocks) where the reference in
# float16 (fp32 inside) has 2e-4: the tolerance is 1.4e-3. Float32 is within 1e-5.
NST_FLOAT16_CANCELLATION = FuzzCase(
    loss="nst_loss", shapes=((1, 1, 1, 2), (1, 1, 1, 2)), layouts=("contiguous", "contiguous"),
    requires_grad=(True, False), dtype=torch.float16,
    options={"kernel": "poly", "degree": 1, "coef": 0.0, "unbiased": False,
             "teacher_term": False, "reduction": "none"})


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="Triton channel-MMD backward rounds its GEMM operands to float16: "
                          "gradient error 20x the reference's where the gradient cancels")
@pytest.mark.parametrize("keep_blocks", [False, True], ids=["recompute", "kept-blocks"])
def test_triton_nst_float16_gradient_under_cancellation(device, keep_blocks):
    with mmd_backward(keep_blocks):
        assert_case_matches_reference(NST_FLOAT16_CANCELLATION, "triton", device)

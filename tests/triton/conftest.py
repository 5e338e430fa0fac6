"""Triton tests: the CPU interpreter (``make test-triton``: TRITON_INTERPRET=1, own pytest
process, since the variable must be set before Triton is imported) or a CUDA device.

Without either, every test here is skipped with the command that runs them.
"""

from dataclasses import dataclass

import pytest
import torch

from tests.helpers import tf32_matmul, triton_device


@pytest.fixture
def device() -> str:
    dev = triton_device()
    if dev is None:
        pytest.skip("Triton tests need CUDA or the interpreter: run `make test-triton`")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    return dev


@dataclass(frozen=True)
class Precise:
    """The most exact case a device runs: float64 under the interpreter; float32 with IEEE
    dots on CUDA (the Gram kernels take no float64 there). Inputs are fresh random tensors."""

    device: str
    dtype: torch.dtype
    tol: float

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64).to(self.device, self.dtype)


@pytest.fixture
def precise(device):
    if device == "cpu":
        yield Precise(device, torch.float64, 1e-12)
        return
    with tf32_matmul(False):
        yield Precise(device, torch.float32, 2e-5)


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16],
                ids=["float32", "float16", "bfloat16"])
def low_precision(request, device) -> torch.dtype:
    """A dtype below float64 (compared by the suite's one rule, tests.helpers)."""
    if request.param == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no bfloat16: this case runs on a GPU")
    return request.param

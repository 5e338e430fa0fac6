"""Triton tests: the CPU interpreter (``make test-triton``: TRITON_INTERPRET=1, own pytest
process, since the variable must be set before Triton is imported) or a CUDA device.

Without either, every test here is skipped with the command that runs them.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _device() -> str | None:
    if torch.cuda.is_available() and not INTERPRET:
        return "cuda"
    return "cpu" if INTERPRET else None


@pytest.fixture
def device() -> str:
    dev = _device()
    if dev is None:
        pytest.skip("Triton tests need CUDA or the interpreter: run `make test-triton`")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    return dev

"""Triton backend wiring: registration, the automatic choice, dtype and TF32 policy."""

import pytest
import torch

from kdfast import backends
from tests.helpers import randn, tf32_matmul

pytestmark = pytest.mark.triton_interpret
CORES = ("attention_map", "similarity", "fsp", "channel_mmd")


def test_every_core_registers_triton(device):
    for core in CORES:
        assert "triton" in backends.implementations(core)


def test_auto_never_picks_triton_for_cpu_tensors(device):
    x = randn(1, 2, 3, 3)
    assert backends.implementations("attention_map")["triton"].supports(x) is (
        None if device == "cpu" else "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                                     "for the CPU interpreter)")
    assert backends.choose("attention_map", "auto", x).backend != "triton"


def test_auto_picks_triton_first_for_cuda_tensors(device):
    if device != "cuda":
        pytest.skip("needs a CUDA device")
    x = randn(1, 2, 3, 3, dtype=torch.float32).to(device)
    assert backends.choose("attention_map", "auto", x).backend == "triton"


def test_mixed_dtypes_are_refused_with_a_reason(device):
    s, t = randn(1, 2, 3, 3).to(device), randn(1, 2, 3, 3, dtype=torch.float32).to(device)
    reason = backends.implementations("channel_mmd")["triton"].supports(s, t)
    assert "one dtype" in reason
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        backends.choose("channel_mmd", "triton", s, t)


def test_dot_precision_follows_allow_tf32(device):
    from kdfast.triton._common import dot_precision
    with tf32_matmul(True):
        assert dot_precision(torch.float32) == "tf32"
    with tf32_matmul(False):
        assert dot_precision(torch.float32) == "ieee"
        assert dot_precision(torch.float64) == "ieee"

"""Runs in the main test process (no marker): registering the Triton backend must not import
Triton, so kdfast imports and works on machines without it."""

import subprocess
import sys

import torch

from kdfast import backends
from tests.helpers import randn


def test_importing_kdfast_does_not_import_triton():
    code = ("import sys, kdfast, kdfast.triton; "
            "assert 'triton' not in sys.modules, 'kdfast imported triton'; "
            "assert all('triton' in kdfast.backends.implementations(core) for core in "
            "('attention_map', 'similarity', 'fsp', 'channel_mmd'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = randn(1, 2, 3, 3, dtype=torch.float32)
    for core in ("attention_map", "similarity", "channel_mmd"):
        reason = backends.implementations(core)["triton"].supports(x, x)
        assert "CUDA tensors" in reason

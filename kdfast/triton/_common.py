"""Shared launch helpers of the Triton kernels: dtypes, dot precision, block configurations.

Everything here imports ``triton``; only the kernel modules import this file, and only when a
Triton implementation actually runs (see :mod:`kdfast.triton`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl  # noqa: F401  (a jit function needs tl in its globals)

from kdfast._precision import NORM_EPS

__all__ = ["INTERPRET", "NORM_EPS", "NO_AUTOTUNE", "as_configs", "configs", "dot_precision",
           "feature_view", "overflowed", "spatial_offset"]

# Under TRITON_INTERPRET=1 (CPU) every kernel uses one fixed configuration: the interpreter
# runs each program in numpy, so autotuning would only multiply the test time. The same fixed
# (small) configurations on a GPU with KDFAST_TRITON_NO_AUTOTUNE=1: for compute-sanitizer runs,
# where benchmarking every candidate would take very long. Both are read at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_AUTOTUNE = INTERPRET or os.environ.get("KDFAST_TRITON_NO_AUTOTUNE") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` (exists in Triton >= 3.0, both 3.6 and 3.9).

    float32 inputs use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set, like
    torch's own matmuls; float64 is always IEEE; float16/bfloat16 keep Triton's default
    ("tf32", which only matters for float32 operands).
    """
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def as_configs(dicts: list[dict]) -> list[triton.Config]:
    """``triton.Config`` objects from dicts of block sizes and optional ``num_warps`` /
    ``num_stages``."""
    out = []
    for config in dicts:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        out.append(triton.Config(meta, num_warps=config.get("num_warps", 4),
                                 num_stages=config.get("num_stages", 2)))
    return out


def configs(fixed: dict, tuned: list[dict]) -> list[triton.Config]:
    """``fixed`` alone under the interpreter (or KDFAST_TRITON_NO_AUTOTUNE=1), else the
    autotuning candidates ``tuned`` (tests/triton/test_configs.py runs each of them under the
    interpreter too)."""
    return as_configs([fixed] if NO_AUTOTUNE else tuned)


def feature_view(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(stride_b, stride_c, W, stride_h, stride_w) of a (B, C, H, W) tensor: element
    (b, c, hw) lives at b·stride_b + c·stride_c + :func:`spatial_offset` (hw)."""
    return x.stride(0), x.stride(1), x.shape[3], x.stride(2), x.stride(3)


@triton.jit
def spatial_offset(hw, W, stride_h, stride_w):
    """Offset of flat spatial index hw = h·W + w in a tensor with strides (stride_h, stride_w):
    the one place the kernels turn a flat position into strided memory (channels_last and
    other layouts are then read in place)."""
    return (hw // W) * stride_h + (hw % W) * stride_w


@triton.jit
def overflowed(norm):
    """Whether a norm computed as sqrt(Σ v²) is +inf, i.e. Σ v² overflowed (a NaN norm is not:
    it stays NaN). The kernels then redo the norm on scaled values."""
    return (norm == norm) & (norm - norm != 0.0)

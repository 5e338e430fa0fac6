"""Triton kernels of the fused cores, and ``supports``: whether they can run given tensors.

Kernels and their launchers, one module per core family (each imports ``triton``):
:mod:`kdfast.triton.attention` (core ``"attention_map"``), :mod:`kdfast.triton.gram`
(``"similarity"``, ``"fsp"``), :mod:`kdfast.triton.mmd` (``"channel_mmd"``),
:mod:`kdfast.triton.softmax_kl` (``"softmax_kl"``), with the shared backward GEMM in
:mod:`kdfast.triton._gemm` and launch helpers in :mod:`kdfast.triton._common`.

The op layer of each core (``torch.library`` custom operators over the launchers, their fakes,
the autograd Function, the ``triton_*`` entry function and its ``backends.register(CORE,
"triton", ..., supports)``) lives in ``kdfast/ops/<core>.py`` beside the native one. Importing
this package never imports ``triton``: the operators import their launcher module on first
use, and :func:`supports` / :func:`supports_without_dot` check that Triton imports (kdfast
works without it).
An implementation can run

* CUDA tensors when Triton imports (``backend="auto"`` picks it first for them), or
* CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported: the Triton
  interpreter, used by the tests. ``auto`` never picks Triton for CPU tensors, so this path
  is reached only with an explicit ``backend="triton"``.

Supported dtypes: float32 (TF32 following ``torch.backends.cuda.matmul.allow_tf32``), float16,
bfloat16 (not under the interpreter, which has no bfloat16) and float64 (on CUDA only for the
attention map: the Gram kernels' ``tl.dot`` has no dependable float64 GPU path in Triton 3.x;
the interpreter runs float64 everywhere, which is how the tests check exactness).

Example:
    >>> kdfast.functional.at_loss(s.cuda(), t.cuda(), backend="triton")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_IMPORT_ERROR: list[str | None] = []  # filled on the first check (a plain list, not
# functools.cache: Dynamo traces through cache wrappers with a warning)


def _triton_import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401
        except ImportError as error:  # pragma: no cover - depends on the machine
            _IMPORT_ERROR.append(f"Triton is not importable ({error})")
        else:
            _IMPORT_ERROR.append(None)
    return _IMPORT_ERROR[0]


def _check(tensors, float64_on_cuda: bool) -> str | None:
    """None when the Triton kernels can run ``tensors``, else the reason they cannot."""
    first = tensors[0]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if first.device.type == "cpu" and not interpret:
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if first.device.type not in ("cpu", "cuda"):
        return f"no Triton kernel for {first.device.type} tensors"
    reason = _triton_import_error()
    if reason is not None:
        return reason
    for t in tensors:
        if t.device != first.device:
            return "all tensors must be on one device"
        if t.dtype not in _DTYPES:
            return f"dtype {t.dtype} is not supported (float32, float16, bfloat16, float64)"
        if t.dtype != first.dtype:
            return f"all tensors must share one dtype (got {first.dtype} and {t.dtype})"
        if t.dtype == torch.bfloat16 and t.device.type == "cpu":
            return "the Triton interpreter has no bfloat16"
        if t.dtype == torch.float64 and t.device.type == "cuda" and not float64_on_cuda:
            return ("float64 Gram kernels run only under the interpreter (tl.dot has no "
                    "dependable float64 path on GPUs in Triton 3.x)")
    return None


def supports(*tensors: torch.Tensor) -> str | None:
    """``supports`` of the Gram/MMD cores (no float64 on CUDA: their kernels use ``tl.dot``)."""
    return _check(tensors, float64_on_cuda=False)


def supports_without_dot(*tensors: torch.Tensor) -> str | None:
    """``supports`` of the attention map, whose kernels have no ``tl.dot``."""
    return _check(tensors, float64_on_cuda=True)

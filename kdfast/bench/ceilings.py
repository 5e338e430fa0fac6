"""The machine's two ceilings, measured once per run.

* Copy bandwidth: ``dst.copy_(src)`` of a large tensor; bytes read + written (2 × size) over
  the time. CPU 128 MiB, CUDA 1 GiB.
* Matmul rate: a square matmul in the benchmark's dtype, 2n³ flops over the time. CPU n = 2048,
  CUDA n = 8192.

Each is the best of several timed repeats after a warm-up (a ceiling is what the machine can
reach, so the best run is the estimate, not the median).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kdfast.bench.measure import Step, time_step


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    copy_bytes: int
    matmul_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def _best_time(run, device: torch.device, repeats: int) -> float:
    step = Step(lambda: None, lambda _: run())
    time_step(step, device)
    return min(time_step(step, device) for _ in range(repeats))


def _copy_time(size: int, device: torch.device, repeats: int) -> float:
    src = torch.empty(size, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return _best_time(lambda: dst.copy_(src), device, repeats)


def measure_ceilings(device: torch.device, dtype: torch.dtype, repeats: int = 5,
                     copy_bytes: int | None = None, matmul_size: int | None = None) -> Ceilings:
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if cuda else 128 << 20)
    matmul_size = matmul_size or (8192 if cuda else 2048)
    copy_time = _copy_time(copy_bytes, device, repeats)
    a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
    b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
    matmul_time = _best_time(lambda: a @ b, device, repeats)
    return Ceilings(2 * copy_bytes / copy_time, 2 * matmul_size ** 3 / matmul_time,
                    copy_bytes, matmul_size)

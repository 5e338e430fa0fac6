"""Quick CPU timing of the native cores against the reference, eager and torch.compile'd.

Forward+backward, fp32, cifar-like shapes (B = 64; C 64..256 at 32x32 / 16x16 / 8x8); the
student requires grad, the teacher does not. Median of ``--repeats`` runs after warm-up,
the providers interleaved round-robin.
Usage: ``python benchmarks/time_native_cpu.py [--cores at,sp,fsp,nst-rbf,nst-poly,nst-linear]
[--repeats 15] [--threads N]``.
Stop-gap until ``python -m kdfast.bench`` lands.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdfast
from kdfast import functional as F

SHAPES = [(64, 64, 32), (64, 128, 16), (64, 256, 8)]


def median_ms(fns, repeats: int) -> list[float]:
    """Median ms of each fn, run round-robin (so a shared machine's load hits all alike)."""
    for fn in fns:
        for _ in range(3):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, slot in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            slot.append(time.perf_counter() - start)
    return [1e3 * statistics.median(slot) for slot in times]


def copy_bandwidth() -> float:
    """Bytes/s of a large copy (read + write counted)."""
    x = torch.empty(64 * 2**20 // 4)
    x.fill_(1.0)
    y = torch.empty_like(x)
    (ms,) = median_ms([lambda: y.copy_(x)], 10)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def step(loss_fn, *inputs):
    def run():
        for x in inputs:
            x.grad = None
        loss_fn(*inputs).backward()
    return run


def cases(core: str, b: int, c: int, hw: int):
    s = torch.randn(b, c, hw, hw, requires_grad=True)
    t = torch.randn(b, c, hw, hw)
    if core == "at":
        return lambda backend: (lambda x, y: F.at_loss(x, y, backend=backend)), (s, t), \
            4 * (3 * s.numel() + t.numel())
    if core.startswith("nst-"):  # nst-rbf, nst-poly, nst-linear: the loss defaults otherwise
        kernel = core[len("nst-"):]
        return lambda backend: (lambda x, y: F.nst_loss(x, y, kernel=kernel, backend=backend)), \
            (s, t), None
    if core == "sp":
        return lambda backend: (lambda x, y: F.sp_loss(x, y, backend=backend)), (s, t), None
    sb = torch.randn(b, c, hw, hw, requires_grad=True)
    tb = torch.randn(b, c, hw, hw)

    def fsp(backend):
        return lambda x, y, z, w: F.fsp_loss([(x, y)], [(z, w)], backend=backend)
    return fsp, (s, sb, t, tb), None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cores", default="at,sp,fsp")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert kdfast.available_backends()["native"], "build the extension first"
    bandwidth = copy_bandwidth()
    print(f"threads {torch.get_num_threads()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| core | B, C, H=W | native ms | reference ms | compiled ms | vs eager | "
          "vs compiled | of bw floor |")
    print("|---|---|---|---|---|---|---|---|")
    for core in args.cores.split(","):
        for b, c, hw in SHAPES:
            make, inputs, floor_bytes = cases(core, b, c, hw)
            compiled_fn = torch.compile(make("reference"))
            native, eager, compiled = median_ms(
                [step(make("native"), *inputs), step(make("reference"), *inputs),
                 step(compiled_fn, *inputs)], args.repeats)
            floor = f"{floor_bytes / bandwidth * 1e3 / native:.0%}" if floor_bytes else "-"
            print(f"| {core} | {b}, {c}, {hw} | {native:.2f} | {eager:.2f} | {compiled:.2f} | "
                  f"{eager / native:.2f}x | {compiled / native:.2f}x | {floor} |")


if __name__ == "__main__":
    main()

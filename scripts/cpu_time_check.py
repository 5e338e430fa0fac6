"""Benchmark rows timed in thread CPU time on one thread, for a CPU shared with other jobs.

``python -m kdfast.bench`` times wall clock, which other jobs on a small machine inflate by
descheduling the benchmark (two-thread runs wait at every OpenMP barrier). With one PyTorch
thread every kernel runs in the calling thread, so ``time.thread_time`` counts the work and
not the waits (cache and memory-bus contention still count). docs/regression_sweep.md used it
to confirm the sweep's losers. Three commands:

    python scripts/cpu_time_check.py rows CORE SHAPE MODE [CORE SHAPE MODE ...]
        eager, torch.compile and native on the bench's inputs, e.g. ``nst-linear 64x128x8x8
        full``
    python scripts/cpu_time_check.py at-floor
        native AT fwd+bwd at the CIFAR stage shapes against the copy floor (128 MiB copy_)
    python scripts/cpu_time_check.py nst-poly-paths
        native NST poly with each of the two Gram paths forced, on shapes around the switch
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
# The checkout this script sits in, not the one an editable install points at (a worktree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfast.bench import floors  # noqa: E402 - after the thread count
from kdfast.bench import providers as prov  # noqa: E402
from kdfast.bench.cores import CORES  # noqa: E402
from kdfast.bench.measure import make_step  # noqa: E402
from kdfast.bench.shapes import FeatureShape, parse_shape  # noqa: E402
from kdfast.functional import at_loss  # noqa: E402


def cpu_times(fn, repeats: int) -> tuple[float, float]:
    """(median, best) thread CPU seconds of fn() after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.thread_time()
        fn()
        times.append(time.thread_time() - begin)
    times.sort()
    return times[len(times) // 2], times[0]


def rows(args: list[str]) -> None:
    for core_name, text, mode in zip(args[::3], args[1::3], args[2::3], strict=True):
        core = CORES[core_name]
        students, teachers = core.make_inputs(parse_shape(text, core.kind), torch.float32,
                                              torch.device("cpu"))
        ms = {}
        for name in ("reference", "compile", "native"):
            step = make_step(prov.build(name, core, students, teachers).fn, students, teachers,
                             mode)
            ms[name] = 1e3 * cpu_times(lambda step=step: step.run(step.prepare()), 15)[0]
        prov.reset_compiled()
        print(f"{core_name} {text} {mode}: eager {ms['reference']:.3f} compile "
              f"{ms['compile']:.3f} native {ms['native']:.3f} ms; native x eager "
              f"{ms['reference'] / ms['native']:.2f}, x compile "
              f"{ms['compile'] / ms['native']:.2f}", flush=True)


def at_floor() -> None:
    src = torch.empty(128 << 20, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / cpu_times(lambda: dst.copy_(src), 15)[1]
    print(f"copy ceiling (best of 15): {bandwidth / 1e9:.2f} GB/s")
    for b, c, h in [(64, 256, 8), (64, 128, 16), (64, 64, 32)]:
        s, t = torch.randn(b, c, h, h, requires_grad=True), torch.randn(b, c, h, h)
        median, best = cpu_times(
            lambda s=s, t=t: torch.autograd.grad(at_loss(s, t, backend="native"), (s,)), 60)
        floor = floors.attention(FeatureShape(b, c, c, h, h), 4)["full"].seconds(bandwidth, 1e30)
        print(f"{b}x{c}x{h}x{h} native full: median {median * 1e3:.3f} ms, best "
              f"{best * 1e3:.3f} ms, floor {floor * 1e3:.3f} ms: {floor / median:.0%} of the "
              f"floor (median), {floor / best:.0%} (best)", flush=True)


def nst_poly_paths() -> None:
    import kdfast.ops.mmd as mmd

    options = mmd.MMDOptions.of("poly", 2, 0.0, (1.0,), False, True)
    for b, m, n, h in [(8, 64, 128, 7), (8, 64, 128, 14), (8, 64, 256, 14), (8, 64, 256, 16),
                       (8, 64, 256, 28), (8, 256, 512, 14), (8, 256, 512, 28),
                       (8, 256, 1024, 28), (64, 256, 256, 8), (64, 128, 128, 16)]:
        s, y = torch.randn(b, m, h, h, requires_grad=True), torch.randn(b, n, h, h)
        ms = [1e3 * cpu_times(lambda f=f, s=s, y=y: torch.autograd.grad(
            f.apply(s, y, *options).sum(), (s,)), 5)[0]
            for f in (mmd.NativeGramMMD, mmd.NativeFeatureGramMMD)]
        path = mmd.channel_mmd_path(s, y, "poly", 2, True)
        print(f"{b}x{m}/{n}x{h}x{h}: D/rows {h * h / (m + n):.2f}, rule {path}; C x C "
              f"{ms[0]:.2f} ms, D x D {ms[1]:.2f} ms, D x D / C x C {ms[1] / ms[0]:.2f}",
              flush=True)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"rows": lambda: rows(rest), "at-floor": at_floor, "nst-poly-paths": nst_poly_paths}[command]()

"""fused-linear-kd fwd+bwd timed interleaved: eager, kdfast's native sweep and Liger-Kernel.

``python -m kdfast.bench`` runs one provider's calls back to back, so on a CPU shared with
other jobs a provider that lands in a quiet (or busy) minute looks faster (or slower) than
it is. Here every round calls each provider once, in turn, on the bench's inputs
(:func:`kdfast.bench.cores.lm_head_inputs`, the core's options, the ``liger`` provider as
kdfast/bench/peers.py configures it), so load changes hit all of them alike:

    python scripts/fused_linear_kd_ab.py 1024x512x32000 [ROUNDS] [PROVIDERS]

PROVIDERS: comma-separated from reference, native, liger (default all three; liger is left
out with a note where liger-kernel is not installed). Prints the median and minimum wall
time of each and the ratios of the medians.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from kdfast.bench.cores import CORES, lm_head_inputs
from kdfast.bench.peers import liger_fused_linear_jsd
from kdfast.bench.shapes import parse_shape

CORE = CORES["fused-linear-kd"]


def steps(students, teachers, names):
    """name -> a fwd+bwd call (the gradients w.r.t. the student's hidden and weight)."""
    found = {}
    for name in names:
        if name == "liger":
            try:
                loss = liger_fused_linear_jsd(CORE, students, teachers)
            except ImportError as error:
                print(f"liger left out: {error}", file=sys.stderr)
                continue
        else:
            def loss(s, t, backend=name):
                return CORE.loss(s, t, backend)
        found[name] = lambda loss=loss: torch.autograd.grad(loss(students, teachers), students)
    return found


def main(argv: list[str]) -> None:
    shape = parse_shape(argv[0], "lmhead")
    rounds = int(argv[1]) if len(argv) > 1 else 5
    names = argv[2].split(",") if len(argv) > 2 else ["reference", "native", "liger"]
    students, teachers = lm_head_inputs(shape, torch.float32, torch.device("cpu"))
    calls = steps(students, teachers, names)
    for call in calls.values():
        call()  # warm-up (Liger's compile)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - begin)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        others = ", ".join(f"{medians[o] / medians[name]:.2f}x {o}" for o in medians if o != name)
        print(f"{shape.label} {name}: median {medians[name]:.2f} s, min {min(t):.2f} s "
              f"({rounds} rounds); speed {others}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Re-times the rows of a benchmark JSON where native ran below a ratio to torch.compile.

One sweep row is one run of each provider after the other, and on a small shared VM a row
swings by ±10-15 % between runs: enough to put a bare GEMM on either side of 1.0×. This
re-times each such row with compile and native *alternated* (ABAB..., ``--rounds`` rounds of
``--repeats`` calls each, wall clock, the bench's inputs and steps) and reports the median of
each provider over all rounds, so that both see the same machine state:

    python scripts/sweep_recheck.py benchmarks/results/X.json --below 1.0 --threads 2 \
        [--rounds 4] [--repeats 5] [--out benchmarks/results/X-recheck.json]

It times the code of the checkout it sits in (not the commit the JSON names).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfast.bench import providers as prov  # noqa: E402 - after sys.path
from kdfast.bench.cores import CORES  # noqa: E402
from kdfast.bench.measure import make_step, time_step  # noqa: E402
from kdfast.bench.runner import environment  # noqa: E402
from kdfast.bench.shapes import parse_shape  # noqa: E402

PROVIDERS = ("compile", "native")


def losing_rows(rows: list[dict], below: float) -> list[tuple[str, str, str]]:
    """(core, shape label, mode) of every row whose native median is under ``below`` times
    compile's."""
    medians: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in rows:
        if row["status"].startswith("ok") and row["provider"] in PROVIDERS:
            key = (row["core"], row["shape_label"], row["mode"])
            medians.setdefault(key, {})[row["provider"]] = row["metrics"]["median_s"]
    return [key for key, m in medians.items()
            if len(m) == 2 and m["compile"] / m["native"] < below]


def alternated_medians(core_name: str, label: str, mode: str, rounds: int,
                       repeats: int) -> dict[str, float]:
    """Median seconds per provider over ``rounds`` alternations of ``repeats`` calls each."""
    core = CORES[core_name]
    cpu = torch.device("cpu")
    students, teachers = core.make_inputs(parse_shape(label, core.kind), torch.float32, cpu)
    steps = {name: make_step(prov.build(name, core, students, teachers).fn, students,
                             teachers, mode) for name in PROVIDERS}
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for step in steps.values():  # compiles, warms the caches
        step.run(step.prepare())
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].extend(time_step(step, cpu) for _ in range(repeats))
    prov.reset_compiled()
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--below", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = losing_rows(json.loads(args.json.read_text())["rows"], args.below)
    results = []
    print("| core | shape | mode | compile ms | native ms | × compile |\n|---|---|---|---|---|---|")
    for core_name, label, mode in keys:
        medians = alternated_medians(core_name, label, mode, args.rounds, args.repeats)
        results.append({"core": core_name, "shape_label": label, "mode": mode,
                        "median_s": medians})
        print(f"| {core_name} | {label} | {mode} | {medians['compile'] * 1e3:.3g} | "
              f"{medians['native'] * 1e3:.3g} | {medians['compile'] / medians['native']:.2f} |",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(torch.device("cpu")),
                                        "source": str(args.json), "rounds": args.rounds,
                                        "repeats": args.repeats, "rows": results}, indent=1))


if __name__ == "__main__":
    main()

"""pytest-benchmark suites over the cores, shapes and providers of ``python -m kdfast.bench``.

The cases come from :mod:`kdfast.bench` itself (the same shape suites, core entries and
providers, not copies). Options:

* ``--bench-suite NAME``: shape suite (default ``quick``; ``tiny`` under
  ``--benchmark-disable``, which the test suite uses to run every case once so that they
  cannot rot).
* ``--bench-compile``: include the ``compile`` providers and the peers (``liger``, which
  compiles its chunks) under ``--benchmark-disable`` too (left out there by default:
  compiling takes tens of seconds per graph on a small CPU).

A case skips, with the reason, where its loss is not implemented yet or its provider cannot
run it (a backend that does not support the device, a naive formulation that would not fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kdfast.bench.cores import CORES, Core
from kdfast.bench.measure import MODES, make_step
from kdfast.bench.providers import Unavailable, build, provider_names
from kdfast.bench.runner import core_status
from kdfast.bench.shapes import SUITES, Shape


def pytest_addoption(parser):
    parser.addoption("--bench-suite", default=None, choices=sorted(SUITES),
                     help="shape suite of the benchmarks (default quick, tiny when disabled)")
    parser.addoption("--bench-compile", action="store_true",
                     help="keep the compile providers under --benchmark-disable")


@dataclass(frozen=True)
class Case:
    core: Core
    shape: Shape
    provider: str
    mode: str
    device: torch.device

    @property
    def id(self) -> str:
        return f"{self.core.name}-{self.shape.label}-{self.provider}-{self.mode}"

    def run(self, benchmark, dtype=torch.float32) -> None:
        status, note = core_status(self.core, self.device, dtype)
        if status == "not implemented":
            pytest.skip(f"{self.core.name}: its loss is not implemented yet")
        assert status == "ok", f"{self.core.name}: {status}: {note}"
        students, teachers = self.core.make_inputs(self.shape, dtype, self.device)
        try:
            fn = build(self.provider, self.core, students, teachers).fn
        except Unavailable as why:
            pytest.skip(f"{self.provider}: {why.status} ({why.note})")
        step = make_step(fn, students, teachers, self.mode)

        def run(state):
            out = step.run(state)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return out

        benchmark.group = f"{self.core.name} {self.shape.label} {self.mode}"
        benchmark.pedantic(run, setup=lambda: ((step.prepare(),), {}), rounds=10,
                           warmup_rounds=2)


def cases(core_names, suite: str, device: torch.device, with_compile: bool) -> list[Case]:
    """Every core × shape × provider × mode case of ``suite``."""
    found = []
    for name in core_names:
        core = CORES[name]
        for shape in SUITES[suite].shapes(core.kind):
            for provider in provider_names(core, device):
                compiles = provider.startswith("compile") or provider in core.peers
                if compiles and not with_compile:  # a peer (Liger) compiles its chunks
                    continue
                found += [Case(core, shape, provider, mode, device) for mode in MODES]
    return found


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    disabled = config.getoption("benchmark_disable")
    suite = config.getoption("bench_suite") or ("tiny" if disabled else "quick")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = cases(metafunc.module.CORES, suite, device,
                  with_compile=not disabled or config.getoption("bench_compile"))
    metafunc.parametrize("case", found, ids=[case.id for case in found])

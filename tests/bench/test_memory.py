"""The CPU peak-memory measurement sees allocator peaks, including transient buffers."""

import torch

from kdfast.bench.cores import CORES
from kdfast.bench.measure import cpu_peak_bytes
from kdfast.bench.runner import run_core
from kdfast.bench.shapes import FeatureShape

MIB = 2 ** 20


def allocate_and_free(nbytes: int) -> None:
    buffer = torch.ones(nbytes // 4)  # touched, then freed before returning
    assert buffer.sum().item() == nbytes // 4


def test_peak_sees_a_transient_buffer():
    assert 4 * MIB <= cpu_peak_bytes(lambda: allocate_and_free(4 * MIB)) < 4.1 * MIB
    assert cpu_peak_bytes(lambda: allocate_and_free(4 * 1024)) < 0.1 * MIB


def test_peak_is_the_maximum_not_the_sum_of_allocations():
    def twice():
        allocate_and_free(2 * MIB)
        allocate_and_free(2 * MIB)
    assert 2 * MIB <= cpu_peak_bytes(twice) < 2.1 * MIB


def test_memory_column_grows_by_what_a_wasteful_provider_allocates(settings, env):
    core = CORES["at"]
    waste = 8 * MIB

    def wasteful(students, teachers):
        allocate_and_free(waste)
        return core.loss(students, teachers, "reference")

    settings.providers = ["reference", "wasteful"]
    settings.modes = ("fwd", "full")
    rows = run_core(core, [FeatureShape(2, 8, 8, 16, 16)], settings, env,
                    extra_providers={"wasteful": wasteful})
    peak = {(r["provider"], r["mode"]): r["metrics"]["peak_bytes"] for r in rows}
    for mode in settings.modes:
        extra = peak[("wasteful", mode)] - peak[("reference", mode)]
        assert 0.95 * waste <= extra <= 1.05 * waste, (mode, extra)

"""Rows that fail are recorded with a status and the run goes on."""

import time

import pytest
import torch

import kdfast.functional
from kdfast.bench import providers
from kdfast.bench.cores import Core, feature_inputs
from kdfast.bench.floors import attention
from kdfast.bench.measure import measure
from kdfast.bench.runner import run_core
from kdfast.bench.shapes import FeatureShape

SHAPE = FeatureShape(2, 3, 4, 4, 4)
CPU = torch.device("cpu")


def inputs():
    return feature_inputs(SHAPE, torch.float32, CPU)


def real_loss(students, teachers):
    return (students[0].mean() - teachers[0].mean()) ** 2


def statuses(rows):
    return {(r["provider"], r["mode"]): r["status"] for r in rows}


def test_out_of_memory_is_a_status_and_the_next_provider_still_runs(settings, env):
    def hungry(students, teachers):
        torch.empty(1 << 62, dtype=torch.uint8)  # no machine has 4 EiB
        return real_loss(students, teachers)

    settings.providers = ["hungry", "fine"]
    core = Core("tiny", "at_loss", feature_inputs, attention)
    rows = run_core(core, [SHAPE], settings, env, {"hungry": hungry, "fine": real_loss})
    result = statuses(rows)
    assert result[("hungry", "fwd")] == result[("hungry", "full")] == "oom"
    assert result[("fine", "fwd")] == result[("fine", "full")] == "ok"
    assert all(r["metrics"]["median_s"] is None for r in rows if r["provider"] == "hungry")


def test_a_row_over_the_time_limit_is_a_timeout():
    def slow(students, teachers):
        time.sleep(0.05)
        return real_loss(students, teachers)

    result = measure(slow, *inputs(), "fwd", CPU, warmup=2, repeats=3, time_limit=0.01)
    assert result.status == "timeout" and not result.times


def test_the_limit_of_a_compiling_provider_starts_after_its_first_call():
    calls = []

    def compiles_first(students, teachers):
        time.sleep(0.1 if not calls else 0.0)
        calls.append(1)
        return real_loss(students, teachers)

    result = measure(compiles_first, *inputs(), "fwd", CPU, warmup=1, repeats=2,
                     time_limit=0.05, compiles=True)
    assert result.status == "ok" and len(result.times) == 2
    assert result.first_call_s >= 0.1


def test_a_row_that_hits_the_limit_later_keeps_its_repeats():
    def slow(students, teachers):
        time.sleep(0.02)
        return real_loss(students, teachers)

    result = measure(slow, *inputs(), "fwd", CPU, warmup=0, repeats=50, time_limit=0.1)
    assert result.status == "ok" and 1 <= len(result.times) < 50
    assert "repeats in the time limit" in result.note


def test_errors_and_missing_losses_are_statuses():
    def broken(students, teachers):
        raise RuntimeError("something else")

    def stub(students, teachers):
        raise NotImplementedError

    assert measure(broken, *inputs(), "fwd", CPU).status == "error"
    assert measure(stub, *inputs(), "full", CPU).status == "not implemented"


def test_a_core_whose_function_is_a_stub_gives_one_not_implemented_row(settings, env,
                                                                       monkeypatch):
    def stub(*args, **kwargs):
        raise NotImplementedError

    monkeypatch.setattr(kdfast.functional, "bench_stub_loss", stub, raising=False)
    core = Core("stub", "bench_stub_loss", feature_inputs, attention)
    rows = run_core(core, [SHAPE, SHAPE], settings, env)
    assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [
        ("all", "all", "not implemented")]


def test_naive_is_skipped_with_a_note_when_it_would_not_fit(monkeypatch):
    monkeypatch.setattr(providers, "memory_budget", lambda device: 1024.0)
    core = Core("nst-like", "nst_loss", feature_inputs, attention,
                naive="kdfast.reference.nst:naive_channel_mmd")
    with pytest.raises(providers.Unavailable) as why:
        providers.build("naive", core, *inputs())
    assert why.value.status == "skipped" and "GiB" in why.value.note


def test_a_missing_naive_formulation_is_not_available():
    core = Core("x", "at_loss", feature_inputs, attention, naive="kdfast.reference.nst:nope")
    with pytest.raises(providers.Unavailable) as why:
        providers.build("naive", core, *inputs())
    assert why.value.status == "not available"


def test_an_unregistered_backend_is_not_available():
    core = Core("x", "at_loss", feature_inputs, attention, registry="attention_map")
    with pytest.raises(providers.Unavailable) as why:
        providers.build("triton-nonexistent", core, *inputs())
    assert why.value.status == "not available"


def test_a_compile_failure_is_a_status_not_a_crash(settings, env, monkeypatch):
    def failing_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor could not lower this")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    providers.reset_compiled()
    settings.providers = ["reference", "compile"]
    core = Core("at-like", "at_loss", feature_inputs, attention)
    result = statuses(run_core(core, [SHAPE], settings, env))
    assert result[("compile", "fwd")] == "compile failed"
    assert result[("reference", "fwd")] == "ok"

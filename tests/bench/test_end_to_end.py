"""``python -m kdfast.bench`` on tiny shapes: table, JSON with every field, plots."""

import functools
import json
import os

import pytest

from kdfast.bench import cli, providers
from kdfast.bench.ceilings import measure_ceilings
from kdfast.bench.runner import add_derived, run_core

ENV_FIELDS = {"device", "device_name", "cpu_name", "gpu_name", "torch_version",
              "triton_version", "git_commit", "host", "date", "load_average", "cpu_capability"}
ROW_FIELDS = ENV_FIELDS | {"core", "shape", "shape_label", "dtype", "provider", "mode",
                           "status", "note", "metrics"}
METRICS = {"median_s", "p20_s", "p80_s", "samples", "first_call_s", "peak_bytes", "floor_bytes",
           "floor_flops", "floor_s", "floor_fraction", "speedup_vs_reference",
           "speedup_vs_compile"}


def test_the_command_writes_table_json_and_plots(tmp_path, capsys, monkeypatch):
    small = functools.partial(measure_ceilings, copy_bytes=1 << 20, matmul_size=64)
    monkeypatch.setattr(cli, "measure_ceilings", small)  # the real sizes take seconds here
    code = cli.main(["--cores", "at", "--shape", "2x3/5x4x4", "--shape", "2x3/5x6x6",
                     "--providers", "reference,native", "--repeats", "2", "--warmup", "1",
                     "--modes", "fwd,full",
                     "--out", str(tmp_path), "--name", "t"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| core | shape | mode | provider | median ms" in out
    assert "ceilings: copy" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    rows = data["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} >= {("reference", "fwd"),
                                                          ("reference", "full")}
    for row in rows:
        assert set(row) >= ROW_FIELDS and set(row["metrics"]) >= METRICS
        assert row["core"] == "at" and row["dtype"] == "float32" and row["device"] == "cpu"
        assert row["shape"]["kind"] == "features"
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, rows
    for row in ok:
        m = row["metrics"]
        assert 0 < m["p20_s"] <= m["median_s"] <= m["p80_s"] and m["samples"] == 2
        assert m["peak_bytes"] > 0 and m["floor_s"] > 0 and m["floor_fraction"] > 0
        if row["provider"] == "reference":
            assert m["speedup_vs_reference"] == pytest.approx(1.0)
    plots = os.listdir(tmp_path / "t")
    assert set(plots) == {"at-fwd.png", "at-full.png"}
    assert all((tmp_path / "t" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_speedups_are_ratios_of_medians(env):
    def row(provider, median):
        return {"core": "at", "shape_label": "s", "mode": "fwd", "provider": provider,
                "status": "ok", "dtype": "float32",
                "shape": {"kind": "features", "batch": 1, "s_channels": 2, "t_channels": 2,
                          "height": 2, "width": 2},
                "metrics": {"median_s": median}}
    rows = [row("reference", 4.0), row("compile", 2.0), row("compile-max-autotune", 1.0),
            row("native", 0.5)]
    from kdfast.bench.cores import CORES
    add_derived(rows, CORES, None)
    native = rows[-1]["metrics"]
    assert native["speedup_vs_reference"] == 8.0
    assert native["speedup_vs_compile"] == 2.0  # against the fastest compile variant
    assert native["floor_s"] is None and native["floor_bytes"] > 0


@pytest.mark.slow
def test_compile_provider_runs_for_real(settings, env):
    """The one test that compiles (tens of seconds on a small CPU): a tiny AT forward."""
    from kdfast.bench.cores import CORES
    from kdfast.bench.shapes import FeatureShape

    providers.reset_compiled()
    settings.providers, settings.modes, settings.repeats = ["reference", "compile"], ("fwd",), 1
    rows = run_core(CORES["at"], [FeatureShape(2, 3, 3, 4, 4)], settings, env)
    add_derived(rows, {"at": CORES["at"]}, None)
    compiled = next(r for r in rows if r["provider"] == "compile")
    assert compiled["status"] == "ok", compiled["note"]
    assert compiled["metrics"]["first_call_s"] > compiled["metrics"]["median_s"]
    assert compiled["metrics"]["speedup_vs_compile"] == pytest.approx(1.0)
    providers.reset_compiled()

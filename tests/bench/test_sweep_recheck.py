"""scripts/sweep_recheck.py: which rows of a sweep JSON it re-times, and one re-timed row."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_recheck.py"


@pytest.fixture(scope="module")
def recheck():
    spec = importlib.util.spec_from_file_location("sweep_recheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(core, shape, mode, provider, median_s, status="ok"):
    return {"core": core, "shape_label": shape, "mode": mode, "provider": provider,
            "status": status, "metrics": {"median_s": median_s}}


def test_losing_rows_compares_native_with_compile(recheck):
    shape = "8x4x2x2"
    rows = [row("sp", shape, "fwd", "compile", 1.0), row("sp", shape, "fwd", "native", 2.0),
            row("sp", shape, "full", "compile", 2.0), row("sp", shape, "full", "native", 1.0),
            row("fsp", shape, "fwd", "compile", 1.0),  # no native row: nothing to compare
            row("fsp", shape, "full", "compile", 1.0),
            row("fsp", shape, "full", "native", None, status="timeout"),
            row("at", shape, "fwd", "reference", 9.0), row("at", shape, "fwd", "native", 1.0),
            row("at", shape, "fwd", "compile", 1.1)]
    assert recheck.losing_rows(rows, 1.0) == [("sp", shape, "fwd")]
    assert recheck.losing_rows(rows, 1.2) == [("sp", shape, "fwd"), ("at", shape, "fwd")]


def test_alternated_medians_times_both_providers(recheck):
    medians = recheck.alternated_medians("at", "2x3x4x4", "fwd", rounds=2, repeats=2)
    assert set(medians) == {"compile", "native"}
    assert all(0 < seconds < 60 for seconds in medians.values())

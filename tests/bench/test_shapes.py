import importlib.util
import pathlib
import sys

import pytest
import torch

from kdfast.bench.cores import CORES
from kdfast.bench.shapes import (
    SUITES,
    EmbeddingShape,
    FeatureShape,
    LmHeadShape,
    LogitShape,
    MapShape,
    parse_shape,
    shape_dict,
    shape_from_dict,
)


@pytest.mark.parametrize("text, kind, expected", [
    ("64x128x32x32", "features", FeatureShape(64, 128, 128, 32, 32)),
    ("8x64/256x7x9", "features", FeatureShape(8, 64, 256, 7, 9)),
    ("64x100", "logits", LogitShape(64, 100)),
    ("64x100", "embeddings", EmbeddingShape(64, 100, 100)),
    ("64x128/512", "embeddings", EmbeddingShape(64, 128, 512)),
    ("64x128/512", "logits", None),
    ("64x128x32x32", "logits", None),
    ("64x100", "features", None),
    ("8x19x512x1024", "maps", MapShape(8, 19, 512, 1024)),
    ("8x19/21x512x1024", "maps", None),
    ("64x100", "maps", None),
    ("256x128x8000", "lmhead", LmHeadShape(256, 128, 8000)),
    ("256x128/64x8000", "lmhead", None),
    ("64x100", "lmhead", None),
    ("8x19x512x1024", "lmhead", None),
    ("1x2x3", "features", None),
    ("1x2x3", "logits", None),
])
def test_parse_shape(text, kind, expected):
    assert parse_shape(text, kind) == expected


@pytest.mark.parametrize("text", ["64x", "ax3", "1x2x3x4x5", "2/3x4x5x6",
                                  "1x2x3/4x5", "2/3x4x5", ""])
def test_parse_shape_rejects_what_is_no_shape(text):
    with pytest.raises(ValueError, match="--shape"):
        parse_shape(text, "features")


@pytest.mark.parametrize("suite", sorted(set(SUITES) - {"llm"}))  # llm: lm heads only
def test_every_suite_has_each_kind_and_sweeps_to_plot(suite):
    for kind in ("features", "logits", "embeddings"):
        shapes = SUITES[suite].shapes(kind)
        assert shapes and all(s.kind == kind for s in shapes)
        assert len(set(shapes)) == len(shapes)
        assert all(shape_from_dict(shape_dict(s)) == s for s in shapes)
    features = SUITES[suite].features
    assert len({s.height for s in features}) >= 2
    assert len({s.s_channels for s in features}) >= 2


def test_the_cwd_maps_are_in_the_test_quick_and_large_suites():
    assert SUITES["tiny"].maps and SUITES["quick"].maps
    assert MapShape(8, 19, 512, 1024) in SUITES["large"].maps
    for suite in SUITES.values():
        assert all(shape_from_dict(shape_dict(s)) == s for s in suite.maps)


def test_the_lm_head_shapes_are_in_the_test_quick_and_large_suites():
    assert SUITES["tiny"].lmhead == (LmHeadShape(8, 16, 101),)
    assert SUITES["quick"].lmhead == (LmHeadShape(256, 128, 8000),)
    assert set(SUITES["large"].lmhead) == {LmHeadShape(1024, 512, 32000),
                                           LmHeadShape(4096, 2048, 128256)}
    for suite in SUITES.values():
        assert all(shape_from_dict(shape_dict(s)) == s for s in suite.lmhead)
    assert LmHeadShape(256, 128, 8000).label == "256x128x8000"


def test_cifar_and_large_suites_match_the_design():
    cifar = SUITES["cifar"].features
    assert {s.height for s in cifar} == {8, 16, 32} and {s.batch for s in cifar} == {64}
    assert {s.s_channels for s in cifar} == {64, 128, 256}
    large = {s.height for s in SUITES["large"].features}
    assert min(large) == 8 and max(large) == 256


BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmarks_take_their_shapes_from_these_suites():
    conftest = _load(BENCHMARKS / "conftest.py")
    found = conftest.cases(("at", "kd"), "quick", torch.device("cpu"), with_compile=False)
    assert {c.shape for c in found if c.core.name == "at"} == set(SUITES["quick"].features)
    assert {c.shape for c in found if c.core.name == "kd"} == set(SUITES["quick"].logits)
    assert not any(c.provider.startswith("compile") for c in found)
    with_compile = conftest.cases(("at",), "tiny", torch.device("cpu"), with_compile=True)
    assert any(c.provider == "compile" for c in with_compile)


def test_every_core_has_a_pytest_benchmark_file():
    covered = [name for path in sorted(BENCHMARKS.glob("bench_*.py"))
               for name in _load(path).CORES]
    assert sorted(covered) == sorted(CORES)


def test_the_sweep_suite_holds_cifar_imagenet_and_the_wider_teachers():
    sweep = SUITES["sweep"]
    for kind in ("features", "logits", "embeddings"):
        for suite in ("cifar", "imagenet"):
            assert set(SUITES[suite].shapes(kind)) <= set(sweep.shapes(kind))
    wider = [s for s in sweep.features if s.t_channels != s.s_channels]
    assert {s.t_channels // s.s_channels for s in wider} == {2, 4}
    assert all(s.t_channels % s.s_channels == 0 for s in wider)
    assert {s.height for s in wider} >= {7, 64} and min(s.height for s in wider) == 7
    assert max(s.height for s in wider) == 64 and all(s.height == s.width for s in wider)
    for ratio in (2, 4):  # every map size at both ratios
        assert ({s.height for s in wider if s.t_channels == ratio * s.s_channels}
                == {s.height for s in wider})
    assert sweep.maps and sweep.lmhead and not sweep.skip_by_default
    assert all(SUITES["sweep"].shapes(core.kind) for core in CORES.values())


def test_the_sweep_suite_is_a_cli_choice():
    from kdfast.bench.cli import parse_args

    args = parse_args(["--suite", "sweep", "--cores", "at,kd"])
    assert args.shapes["at"] == list(SUITES["sweep"].features)

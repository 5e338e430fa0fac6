import pytest
import torch

from kdfast.bench.cli import output_paths, parse_args
from kdfast.bench.cores import CORES
from kdfast.bench.shapes import SUITES, FeatureShape, LmHeadShape, LogitShape


def test_defaults_run_every_core_on_the_quick_suite():
    args = parse_args([])
    assert args.cores == list(CORES) and args.suite == "quick"
    assert args.modes == ["fwd", "bwd", "full"] and args.providers is None
    assert args.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert args.shapes["at"] == list(SUITES["quick"].features)
    assert args.shapes["kd"] == list(SUITES["quick"].logits)


def test_lists_and_numbers():
    args = parse_args(["--cores", "at,kd", "--modes", "fwd,bwd", "--providers", "reference,triton",
                       "--repeats", "3", "--warmup", "0", "--time-limit", "2.5", "--dtype",
                       "bfloat16", "--device", "cpu", "--no-plots", "--suite", "cifar",
                       "--threads", "1"])
    assert args.cores == ["at", "kd"] and args.modes == ["fwd", "bwd"]
    assert args.providers == ["reference", "triton"]
    assert (args.repeats, args.warmup, args.time_limit, args.threads) == (3, 0, 2.5, 1)
    assert args.dtype == "bfloat16" and args.no_plots and args.suite == "cifar"


def test_explicit_shapes_go_to_the_cores_of_their_kind():
    args = parse_args(["--cores", "at,kd", "--shape", "4x8/16x5x5", "--shape", "32x10"])
    assert args.shapes == {"at": [FeatureShape(4, 8, 16, 5, 5)], "kd": [LogitShape(32, 10)]}


def test_three_sizes_are_an_lm_head_shape():
    args = parse_args(["--cores", "fused-linear-kd,kd", "--shape", "256x128x8000",
                       "--shape", "32x10"])
    assert args.shapes == {"fused-linear-kd": [LmHeadShape(256, 128, 8000)],
                           "kd": [LogitShape(32, 10)]}


@pytest.mark.parametrize("argv", [
    ["--cores", "at,nope"], ["--modes", "fwd,sideways"], ["--providers", "reference,cuDNN"],
    ["--suite", "huge"],
    ["--repeats", "0"], ["--time-limit", "0"], ["--threads", "0"], ["--shape", "1x2x3"],
    ["--cores", "kd", "--shape", "4x8x5x5"], ["--dtype", "int8"],
])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_output_goes_to_a_gitignored_local_name_unless_out_is_given():
    env = {"device_name": "NVIDIA H100 80GB HBM3"}
    json_path, plots = output_paths(parse_args([]), env)
    assert json_path.startswith("benchmarks/results/local-") and json_path.endswith(".json")
    json_path, plots = output_paths(parse_args(["--out", "d", "--suite", "cifar"]), env)
    assert json_path == "d/nvidia-h100-80gb-hbm3-cifar.json"
    assert plots == "d/nvidia-h100-80gb-hbm3-cifar"
    assert output_paths(parse_args(["--out", "d", "--name", "x"]), env)[0] == "d/x.json"
    explicit = parse_args(["--out", "d", "--cores", "kd", "--shape", "8x10"])
    assert output_paths(explicit, env)[0] == "d/nvidia-h100-80gb-hbm3-shapes.json"

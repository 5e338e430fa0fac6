"""The training-step benchmark (``--steps``) at the tiny scales: one step of each kind runs, the
rows carry the documented fields, the models are the sizes they claim, bad arguments stop."""

import json

import pytest
import torch

from kdfast.bench import cli, steps
from kdfast.bench.models import SCALES, cifar_resnet
from kdfast.bench.runner import Settings

ROW_FIELDS = {"device", "device_name", "torch_version", "git_commit", "host", "date",
              "load_average", "benchmark", "scale", "model", "batch", "loss_set", "provider",
              "dtype", "status", "note", "metrics"}
METRICS = {"median_s", "p20_s", "p80_s", "samples", "first_call_s", "peak_bytes",
           "loss_median_s", "loss_peak_bytes", "loss_share", "over_base_s",
           "speedup_vs_reference", "speedup_vs_compile"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine, idle OpenMP threads
    spinning for a descheduled one cost these tests most of their time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fast():
    return Settings(torch.device("cpu"), providers=["reference", "native", "naive"], warmup=1,
                    repeats=1, time_limit=30.0)


def test_cifar_resnets_have_their_published_sizes():
    # ResNet-110 and ResNet-32 of He et al. (CIFAR-10): 1.7M and 0.46M parameters; 100
    # classes add 64·90 weights and 90 biases to the classifier.
    assert sum(p.numel() for p in cifar_resnet(18).parameters()) == pytest.approx(1.74e6, rel=0.01)
    assert sum(p.numel() for p in cifar_resnet(5).parameters()) == pytest.approx(0.47e6, rel=0.01)
    outputs = cifar_resnet(1, classes=7)(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 16, 32, 32), (2, 32, 16, 16),
                                                 (2, 64, 8, 8), (2, 7)]


def test_dense_scale_has_the_stage_maps_it_names():
    scale = SCALES["dense"]
    images, labels = scale.inputs(torch.device("cpu"))
    assert images.shape == (8, 3, 128, 128) and labels.shape == (8, 64, 64)
    student = scale.student()
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in student(images[:1])]
    assert shapes == [(1, 32, 128, 128), (1, 128, 64, 64), (1, 19, 64, 64)]


@pytest.mark.parametrize("name", ["tiny", "tiny-dense"])
def test_a_step_of_every_loss_set_runs_and_rows_have_the_fields(name, fast, env):
    rows = steps.run_scale(SCALES[name], fast, env)
    sets = [s.name for s in steps.LOSS_SETS[SCALES[name].family]]
    assert [(r["loss_set"], r["provider"]) for r in rows if r["provider"] != "naive"] == [
        ("none", "none"), *((s, p) for s in sets for p in ("reference", "native"))]
    for row in rows:
        assert set(row) >= ROW_FIELDS and set(row["metrics"]) >= METRICS, row
        assert row["status"] == "ok", row
        m = row["metrics"]
        assert 0 < m["p20_s"] <= m["median_s"] <= m["p80_s"] and m["samples"] == 1
        assert m["peak_bytes"] > 0
        if row["loss_set"] == "none":
            assert m["loss_median_s"] is None and m["speedup_vs_reference"] is None
            continue
        assert m["loss_median_s"] > 0 and m["loss_share"] == pytest.approx(
            m["loss_median_s"] / m["median_s"])
        if row["provider"] == "reference":
            assert m["speedup_vs_reference"] == pytest.approx(1.0)
    notes = {r["loss_set"]: r["note"] for r in rows if r["provider"] == "native"}
    if name == "tiny":
        assert notes["KD+FitNet"] == "fitnet: reference (no native core)"
        assert {r["loss_set"] for r in rows if r["provider"] == "naive"} == {"KD+NST"}


def test_the_step_trains_the_student_and_not_the_teacher(fast):
    pair = steps.build_pair(SCALES["tiny"], fast.device)
    loss_set = steps.LOSS_SETS["cifar"][3]  # KD+FitNet: the connector is trained too
    module = steps.DistillLosses(loss_set, pair.student_out, pair.teacher_out)
    module.use("native", pair.student_out, pair.teacher_out)
    teacher_before = [p.clone() for p in pair.teacher.parameters()]
    student_before = [p.clone() for p in pair.student.parameters()]
    connector_before = [p.clone() for p in module.parameters()]
    optimizer = steps._optimizer([pair.student, module])
    step = steps.training_step(pair.teacher, pair.student, pair.images, pair.labels, optimizer,
                               module, loss_set.outputs())
    step.run(step.prepare())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, pair.teacher.parameters(),
                                                 strict=True))
    for before, model in ((student_before, pair.student), (connector_before, module)):
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_command_writes_the_tables_json_and_plots(tmp_path, capsys):
    code = cli.main(["--steps", "--steps-scale", "tiny", "--loss-sets", "KD+AT,KD+SP",
                     "--providers", "reference,native", "--repeats", "1", "--warmup", "1",
                     "--device", "cpu", "--out", str(tmp_path), "--name", "s"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| scale | loss set | provider | step ms |" in out
    assert "| scale | loss set | reference ms / MiB | compile ms / MiB | native ms / MiB |" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["settings"]["steps_scale"] == ["tiny"] and data["settings"]["repeats"] == 1
    assert [(r["loss_set"], r["provider"]) for r in data["rows"]] == [
        ("none", "none"), ("KD+AT", "reference"), ("KD+AT", "native"), ("KD+SP", "reference"),
        ("KD+SP", "native")]
    assert (tmp_path / "s" / "steps-tiny.png").stat().st_size > 0


def test_step_defaults():
    args = cli.parse_args(["--steps"])
    assert args.steps_scale == ["cifar", "dense"] and (args.repeats, args.warmup) == (3, 1)
    assert args.providers is None and args.loss_sets is None
    assert cli.parse_args([]).repeats == 10
    env = {"device_name": "NVIDIA H100 80GB HBM3"}
    assert cli.output_paths(cli.parse_args(["--steps", "--out", "d"]), env)[0] == (
        "d/nvidia-h100-80gb-hbm3-steps-cifar-dense.json")


@pytest.mark.parametrize("argv, says", [
    (["--steps", "--steps-scale", "huge"], "unknown scale huge"),
    (["--steps", "--loss-sets", "KD+XYZ"], "unknown loss set KD+XYZ"),
    (["--steps", "--steps-scale", "cifar", "--loss-sets", "CWD"],
     "--loss-sets CWD: not a loss set of --steps-scale cifar; choose from KD+AT"),
    (["--steps", "--providers", "compile-max-autotune"],
     "--providers compile-max-autotune: not a provider of --steps"),
    (["--steps", "--dtype", "bfloat16"], "--dtype bfloat16: --steps runs float32"),
    (["--steps", "--shape", "2x3x4x4"], "--shape does not apply to --steps"),
    (["--steps", "--cores", "at"], "--cores does not apply to --steps"),
    (["--steps-scale", "cifar"], "add --steps"),
    (["--steps", "--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_step_arguments_exit_with_a_message(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_interleaved_timing_runs_the_steps_round_robin_and_keeps_a_failure_to_its_row():
    from kdfast.bench.measure import Step, measure_interleaved

    calls = []

    def step(k):
        return Step(lambda: None, lambda _: calls.append(k))

    def broken(_):
        calls.append("x")
        raise RuntimeError("boom")

    results = measure_interleaved([step(0), Step(lambda: None, broken), step(2)],
                                  torch.device("cpu"), warmup=1, repeats=2)
    # warm-up and two repeats round-robin, the broken step dropped after its first call, then
    # one peak-memory call of each step that ran
    assert calls == [0, "x", 2, 0, 2, 0, 2, 0, 2]
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].note == "RuntimeError: boom" and results[1].times == []
    assert [len(r.times) for r in results] == [2, 0, 2] and results[0].peak_bytes is not None

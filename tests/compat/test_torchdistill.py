"""kdfast.compat.torchdistill: kdfast's losses built by torchdistill's own registry and
high-level loss from a config dict, fed the io_dict its forward hooks produce, against kdfast
called directly; parity with torchdistill's losses where they compute the same thing."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast.functional as F

pytest.importorskip("torchdistill.losses.registry",
                    reason="torchdistill not installed (pip install --no-deps torchdistill)")
from torchdistill.losses import mid_level  # noqa: E402
from torchdistill.losses.registry import (  # noqa: E402
    MIDDLE_LEVEL_LOSS_DICT,
    get_high_level_loss,
    get_mid_level_loss,
)

from kdfast.compat import torchdistill as plugin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B = 6


def logits(c=10):
    return lambda: torch.randn(B, c, dtype=torch.float64)


def features(c=4, h=8, w=8):
    return lambda: torch.randn(B, c, h, w, dtype=torch.float64)


def embeddings(d=16):
    return lambda: torch.randn(B, d, dtype=torch.float64)


TWO = ("student", "teacher")
# name -> (slots (side, keyword prefix, make tensor), options, kdfast called directly,
#          uses targets)
CASES = {
    "KDFastKDLoss": (TWO, (logits(), logits()), {"temperature": 2.0},
                     lambda s, t, **o: F.kd_loss(s, t, **o), False),
    "KDFastATLoss": (TWO, (features(4), features(6)), {"p": 2.0, "mode": "paper"},
                     lambda s, t, **o: F.at_loss(s, t, **o), False),
    "KDFastSPLoss": (TWO, (features(4), features(6, 4, 4)), {},
                     lambda s, t, **o: F.sp_loss(s, t, **o), False),
    "KDFastNSTLoss": (TWO, (features(4), features(6)), {"kernel": "poly"},
                      lambda s, t, **o: F.nst_loss(s, t, **o), False),
    "KDFastFSPLoss": (("student_first", "student_second", "teacher_first", "teacher_second"),
                      (features(4), features(6), features(4), features(6)), {},
                      lambda s1, s2, t1, t2, **o: F.fsp_loss([(s1, s2)], [(t1, t2)], **o),
                      False),
    "KDFastRKDLoss": (TWO, (embeddings(16), embeddings(32)),
                      {"distance_weight": 1.0, "angle_weight": 2.0},
                      lambda s, t, **o: F.rkd_loss(s, t, **o), False),
    "KDFastABLoss": (TWO, (features(4), features(4)), {"margin": 0.5},
                     lambda s, t, **o: F.ab_loss(s, t, **o), False),
    "KDFastPKTLoss": (TWO, (embeddings(16), embeddings(32)), {},
                      lambda s, t, **o: F.pkt_loss(s, t, **o), False),
    "KDFastCCLoss": (TWO, (embeddings(16), embeddings(16)), {"gamma": 0.4},
                     lambda s, t, **o: F.cc_loss(s, t, **o), False),
    "KDFastDKDLoss": (TWO, (logits(), logits()), {"temperature": 4.0, "beta": 2.0},
                      lambda s, t, y, **o: F.dkd_loss(s, t, y, **o), True),
    "KDFastDISTLoss": (TWO, (logits(), logits()), {"beta": 2.0, "temperature": 2.0},
                       lambda s, t, **o: F.dist_loss(s, t, **o), False),
    "KDFastCWDLoss": (TWO, (features(4), features(4)), {"temperature": 4.0},
                      lambda s, t, **o: F.cwd_loss(s, t, **o), False),
    "KDFastFitNetLoss": (TWO, (features(4), features(4)), {},
                         lambda s, t, **o: F.fitnet_loss(s, t, **o), False),
    "KDFastPKDLoss": (TWO, (features(4), features(4)), {},
                      lambda s, t, **o: F.pkd_loss(s, t, **o), False),
    "KDFastLSKDLoss": (TWO, (logits(), logits()), {"temperature": 2.0},
                       lambda s, t, **o: F.lskd_loss(s, t, **o), False),
    "KDFastWSLDLoss": (TWO, (logits(), logits()), {"temperature": 2.0},
                       lambda s, t, y, **o: F.wsld_loss(s, t, y, **o), True),
    "KDFastKDSVDLoss": (("student_first", "student_second", "teacher_first", "teacher_second"),
                        (features(4), features(6, 4, 4), features(4), features(6, 4, 4)),
                        {"k": 1},
                        lambda s1, s2, t1, t2, **o: F.kdsvd_loss([s1, s2], [t1, t2], **o),
                        False),
    "KDFastSRDLoss": (("student", "teacher", "student_logits", "teacher_logits"),
                      (embeddings(16), embeddings(16), logits(), logits()), {},
                      lambda s, t, sl, tl, **o: F.srd_loss(s, t, sl, tl, **o), False),
}


def build_io(slots, makers):
    """The io dicts torchdistill's forward hooks fill ({path: {"input": x, "output": y}}),
    one path per slot, reading "output" and "input" alternately; the other io is noise."""
    io_dicts = {"student": {}, "teacher": {}}
    kwargs, values = {}, []
    for i, (slot, make) in enumerate(zip(slots, makers, strict=True)):
        side = slot.split("_")[0]
        path, io = f"{slot}.layer{i}", ("output", "input")[i % 2]
        other = ("input", "output")[i % 2]
        value = make()
        io_dicts[side][path] = {io: value, other: make()}
        kwargs[f"{slot}_module_path"], kwargs[f"{slot}_module_io"] = path, io
        values.append(value)
    return io_dicts, kwargs, values


def test_every_loss_is_registered_on_import():
    assert set(plugin.LOSS_NAMES) == set(CASES)
    for name in plugin.LOSS_NAMES:
        assert MIDDLE_LEVEL_LOSS_DICT[name] is getattr(plugin, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_weighted_sum_config_equals_kdfast(name):
    torch.manual_seed(0)
    slots, makers, options, direct, uses_targets = CASES[name]
    io_dicts, io_kwargs, values = build_io(slots, makers)
    targets = torch.randint(0, 10, (B,))
    for value in values[:1]:
        value.requires_grad_()
    # the criterion section as torchdistill's YAML loader produces it
    config = {"key": "WeightedSumLoss",
              "kwargs": {"sub_terms": {"term": {"criterion": {"key": name,
                                                              "kwargs": {**io_kwargs,
                                                                         **options}},
                                                "weight": 0.5}}}}
    criterion = get_high_level_loss(config)
    got = criterion(io_dicts, {}, targets)
    expected = 0.5 * direct(*values, *([targets] if uses_targets else []), **options)
    torch.testing.assert_close(got, expected)
    (grad_got,) = torch.autograd.grad(got, values[0])
    (grad_expected,) = torch.autograd.grad(expected, values[0])
    torch.testing.assert_close(grad_got, grad_expected)


def test_sub_terms_mix_with_torchdistill_losses():
    torch.manual_seed(0)
    s, t, y = torch.randn(B, 10), torch.randn(B, 10), torch.randint(0, 10, (B,))
    io_dict = {"student": {"fc": {"output": s}}, "teacher": {"fc": {"output": t}}}
    fc = {"student_module_path": "fc", "student_module_io": "output",
          "teacher_module_path": "fc", "teacher_module_io": "output"}
    config = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
        "ce": {"criterion": {"key": "CrossEntropyLoss", "kwargs": {}},
               "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                   "input": {"is_from_teacher": False, "module_path": "fc", "io": "output"},
                   "target": {"uses_label": True}}},
               "weight": 1.0},
        "kd": {"criterion": {"key": "KDFastKDLoss", "kwargs": {**fc, "temperature": 4.0}},
               "weight": 0.9},
        "dkd": {"criterion": {"key": "KDFastDKDLoss", "kwargs": fc}, "weight": 0.1},
    }}}
    got = get_high_level_loss(config)(io_dict, {}, y)
    expected = (torch.nn.functional.cross_entropy(s, y) + 0.9 * F.kd_loss(s, t, temperature=4.0)
                + 0.1 * F.dkd_loss(s, t, y))
    torch.testing.assert_close(got, expected)


def test_options_are_the_kdfast_modules_attributes():
    loss = get_mid_level_loss({"key": "KDFastKDLoss", "kwargs": {
        "student_module_path": "fc", "student_module_io": "output",
        "teacher_module_path": "fc", "teacher_module_io": "output", "temperature": 3.0}})
    assert loss.kdfast_loss.temperature == 3.0
    assert "temperature=3.0" in str(loss)
    with pytest.raises(ValueError, match="temperature"):
        loss.kdfast_loss.temperature = -1.0


def test_missing_io_keywords_and_unknown_options_fail_clearly():
    with pytest.raises(TypeError, match="teacher_module_path, teacher_module_io"):
        plugin.KDFastKDLoss(student_module_path="fc", student_module_io="output")
    with pytest.raises(TypeError, match="tau"):  # DIST's torchdistill name, not KD's
        plugin.KDFastKDLoss(student_module_path=".", student_module_io="output",
                            teacher_module_path=".", teacher_module_io="output", tau=1.0)
    with pytest.raises(TypeError, match="twice"):
        plugin.KDFastDISTLoss(**IO, tau=1.0, temperature=2.0)
    with pytest.raises(ValueError, match="reduction"):
        plugin.KDFastSPLoss(student_output_path=".", teacher_output_path=".", reduction="sum")


def test_label_losses_need_targets():
    loss = plugin.KDFastDKDLoss(student_module_path="fc", student_module_io="output",
                                teacher_module_path="fc", teacher_module_io="output")
    io_dict = {"fc": {"output": torch.randn(B, 10)}}
    with pytest.raises(ValueError, match="targets"):
        loss(io_dict, io_dict, None)


# parity with torchdistill's own losses: same inputs, its keywords, same values


def one_pair_io(s, t, path="."):
    return {path: {"output": s}}, {path: {"output": t}}


IO = {"student_module_path": ".", "student_module_io": "output",
      "teacher_module_path": ".", "teacher_module_io": "output"}


def test_kd_is_torchdistills_soft_term_times_t_squared():
    s, t = torch.randn(B, 10, dtype=torch.float64), torch.randn(B, 10, dtype=torch.float64)
    theirs = mid_level.KDLoss(**IO, temperature=4.0, alpha=0.0)(*one_pair_io(s, t))
    ours = plugin.KDFastKDLoss(**IO, temperature=4.0)(*one_pair_io(s, t))
    torch.testing.assert_close(ours, 16.0 * theirs)


def test_pkt_equals_torchdistills():
    s, t = torch.randn(B, 16, dtype=torch.float64), torch.randn(B, 32, dtype=torch.float64)
    theirs = mid_level.PKTLoss(**IO)(*one_pair_io(s, t))
    ours = plugin.KDFastPKTLoss(**IO)(*one_pair_io(s, t))
    torch.testing.assert_close(ours, theirs)


def test_dist_equals_torchdistills():
    s, t = torch.randn(B, 10, dtype=torch.float64), torch.randn(B, 10, dtype=torch.float64)
    theirs = mid_level.DISTLoss(**IO, beta=2.0, gamma=0.5, tau=2.0)(*one_pair_io(s, t))
    ours = plugin.KDFastDISTLoss(**IO, beta=2.0, gamma=0.5, temperature=2.0)(
        *one_pair_io(s, t))
    torch.testing.assert_close(ours, theirs)


def test_rkd_equals_torchdistills():
    s, t = torch.randn(B, 16, dtype=torch.float64), torch.randn(B, 32, dtype=torch.float64)
    theirs = mid_level.RKDLoss(student_output_path=".", teacher_output_path=".",
                               dist_factor=1.0, angle_factor=2.0, reduction="mean")(
        *one_pair_io(s, t))
    ours = plugin.KDFastRKDLoss(**IO, distance_weight=1.0, angle_weight=2.0)(
        *one_pair_io(s, t))
    torch.testing.assert_close(ours, theirs)


def test_cc_equals_torchdistills_cckd():
    s, t = torch.randn(B, 16, dtype=torch.float64), torch.randn(B, 16, dtype=torch.float64)
    theirs = mid_level.CCKDLoss(student_linear_path=".", teacher_linear_path=".",
                                kernel_config={"type": "gaussian", "gamma": 0.4, "max_p": 2},
                                reduction="batchmean")(*one_pair_io(s, t))
    ours = plugin.KDFastCCLoss(**IO)(*one_pair_io(s, t))
    torch.testing.assert_close(ours, theirs)


def test_sp_follows_the_paper_not_torchdistills_l1_rows():
    s, t = torch.randn(B, 4, 8, 8, dtype=torch.float64), torch.randn(B, 6, 4, 4,
                                                                    dtype=torch.float64)
    ours = plugin.KDFastSPLoss(**IO)(*one_pair_io(s, t))

    def gram(x):  # the paper's: rows divided by their L2 norm
        g = x.flatten(1) @ x.flatten(1).T
        return g / g.norm(dim=1, keepdim=True)

    torch.testing.assert_close(ours, ((gram(t) - gram(s)) ** 2).sum() / B ** 2)
    theirs = mid_level.SPKDLoss(student_output_path=".", teacher_output_path=".",
                                reduction="batchmean")(*one_pair_io(s, t))
    assert not torch.allclose(ours, theirs)
    assert "L1" in plugin.KDFastSPLoss.__doc__ and "paper" in plugin.KDFastSPLoss.__doc__


def test_importing_kdfast_does_not_import_torchdistill():
    code = "import sys, kdfast; assert 'torchdistill' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_without_torchdistill_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdistill", None)
    monkeypatch.setitem(sys.modules, "torchdistill.losses", None)
    monkeypatch.setitem(sys.modules, "torchdistill.losses.registry", None)
    monkeypatch.delitem(sys.modules, "kdfast.compat.torchdistill")
    with pytest.raises(ImportError, match="pip install --no-deps torchdistill"):
        importlib.import_module("kdfast.compat.torchdistill")


def test_example_yaml_builds_through_torchdistill():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    config = yaml.safe_load((ROOT / "examples" / "torchdistill_kdfast.yaml").read_text())
    criterion = get_high_level_loss(config["criterion"])
    names = {type(c).__name__ for c, _ in criterion.term_dict.values()}
    assert {"KDFastKDLoss", "KDFastATLoss", "KDFastSPLoss", "KDFastDKDLoss"} <= names


def test_example_step_runs():
    pytest.importorskip("yaml", reason="PyYAML not installed")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "torchdistill_step.py")],
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                            capture_output=True, text=True, check=True)
    assert "KDFastKDLoss" in result.stdout
    loss = float(result.stdout.split("loss ")[-1])
    assert loss == loss and loss > 0


# a torchdistill config switches by renaming its key: torchdistill's own loss and the kdfast
# one built from the same kwargs, through WeightedSumLoss, on the same io_dict


def torchdistill_io_dict():
    """What torchdistill's forward hooks store for a tiny CNN: two stages, a pooled
    embedding ("fc" input), logits ("fc" output), a linear embedding and a normed feature."""
    def side():
        x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
        y = torch.randn(B, 8, 8, 8, dtype=torch.float64)
        z = torch.randn(B, 16, 4, 4, dtype=torch.float64)
        linear = torch.nn.functional.normalize(torch.randn(B, 16, dtype=torch.float64), dim=1)
        return {"layer1": {"input": x, "output": y}, "layer2": {"input": y, "output": z},
                "fc": {"input": z.mean((2, 3)), "output": torch.randn(B, 10,
                                                                      dtype=torch.float64)},
                "linear": {"output": linear},
                "norm_layer": {"output": torch.randn(B, 16, dtype=torch.float64)}}
    return {"student": side(), "teacher": side()}


def io(path, which="output"):
    return {"path": path, "io": which}


FC = {"student_module_path": "fc", "student_module_io": "output",
      "teacher_module_path": "fc", "teacher_module_io": "output"}
AT_PAIRS = {"pair1": {"student": io("layer1"), "teacher": io("layer1"), "weight": 1},
            "pair2": {"student": io("layer2"), "teacher": io("layer2"), "weight": 0.5}}
FSP_PAIRS = {"pair1": {"student_first": io("layer1", "input"), "student_second": io("layer1"),
                       "teacher_first": io("layer1", "input"), "teacher_second": io("layer1"),
                       "weight": 1},
             "pair2": {"student_first": io("layer2", "input"), "student_second": io("layer2"),
                       "teacher_first": io("layer2", "input"), "teacher_second": io("layer2"),
                       "weight": 2}}
# (torchdistill key, kdfast key, torchdistill's kwargs as in its configs)
RENAMED = [
    ("KDLoss", "KDFastKDLoss", {**FC, "temperature": 4.0, "alpha": 0.5}),
    ("KDLoss", "KDFastKDLoss", {**FC, "temperature": 2.0, "alpha": 0.3, "beta": 0.9,
                                "reduction": "sum"}),
    ("KDLoss", "KDFastKDLoss", {**FC, "temperature": 4.0, "alpha": 0}),
    ("LogitStdKDLoss", "KDFastLSKDLoss", {**FC, "temperature": 2.0, "alpha": 0.5, "beta": 9}),
    ("ATLoss", "KDFastATLoss", {"at_pairs": AT_PAIRS, "mode": "code"}),
    ("ATLoss", "KDFastATLoss", {"at_pairs": AT_PAIRS, "mode": "paper"}),
    ("ATLoss", "KDFastATLoss", {"at_pairs": AT_PAIRS}),
    ("AltActTransferLoss", "KDFastABLoss", {"feature_pairs": AT_PAIRS, "margin": 1.0,
                                            "reduction": "mean"}),
    ("RKDLoss", "KDFastRKDLoss", {"student_output_path": "linear",
                                  "teacher_output_path": "linear", "dist_factor": 1.0,
                                  "angle_factor": 2.0, "reduction": "mean"}),
    ("CCKDLoss", "KDFastCCLoss", {"student_linear_path": "linear",
                                  "teacher_linear_path": "linear",
                                  "kernel_config": {"type": "gaussian", "gamma": 0.4,
                                                    "max_p": 2},
                                  "reduction": "batchmean"}),
    ("CCKDLoss", "KDFastCCLoss", {"student_linear_path": "linear",
                                  "teacher_linear_path": "linear",
                                  "kernel_config": {"type": "bilinear"},
                                  "reduction": "batchmean"}),
    ("DISTLoss", "KDFastDISTLoss", {**FC, "beta": 2.0, "gamma": 0.5, "tau": 2.0}),
    ("SRDLoss", "KDFastSRDLoss", {
        "student_feature_module_path": "norm_layer", "student_feature_module_io": "output",
        "teacher_feature_module_path": "norm_layer", "teacher_feature_module_io": "output",
        "student_linear_module_path": "fc", "student_linear_module_io": "output",
        "teacher_linear_module_path": "fc", "teacher_linear_module_io": "output",
        "exponent": 4.0, "temperature": 1.0, "reduction": "batchmean"}),
    ("PKTLoss", "KDFastPKTLoss", {"student_module_path": "fc", "student_module_io": "input",
                                  "teacher_module_path": "fc", "teacher_module_io": "input",
                                  "eps": 1e-7}),
]


def weighted_sum(key, kwargs, weight=0.7):
    return get_high_level_loss({"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
        "term": {"criterion": {"key": key, "kwargs": kwargs}, "weight": weight}}}})


@pytest.mark.parametrize(("theirs", "ours", "kwargs"), RENAMED,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(RENAMED)])
def test_renaming_the_key_gives_torchdistills_value(theirs, ours, kwargs):
    torch.manual_seed(0)
    io_dicts = torchdistill_io_dict()
    targets = torch.randint(0, 10, (B,))
    expected = weighted_sum(theirs, kwargs)(io_dicts, {}, targets)
    got = weighted_sum(ours, kwargs)(io_dicts, {}, targets)
    torch.testing.assert_close(got, expected)


def test_kd_without_targets_is_torchdistills_bare_kl():
    io_dicts = torchdistill_io_dict()
    kwargs = {**FC, "temperature": 4.0, "alpha": 0.5}
    expected = weighted_sum("KDLoss", kwargs)(io_dicts, {}, None)
    got = weighted_sum("KDFastKDLoss", kwargs)(io_dicts, {}, None)
    torch.testing.assert_close(got, expected)


def test_kd_mixture_follows_a_temperature_schedule():
    io_dicts = torchdistill_io_dict()
    targets = torch.randint(0, 10, (B,))
    ours = plugin.KDFastKDLoss(**FC, temperature=4.0, alpha=0.5)
    ours.kdfast_loss.temperature = 2.0
    theirs = mid_level.KDLoss(**FC, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(ours(io_dicts["student"], io_dicts["teacher"], targets),
                               theirs(io_dicts["student"], io_dicts["teacher"], targets))


@pytest.mark.parametrize(("theirs", "ours", "kwargs"), [
    ("SPKDLoss", "KDFastSPLoss", {"student_output_path": "layer2",
                                  "teacher_output_path": "layer2", "reduction": "batchmean"}),
    ("FSPLoss", "KDFastFSPLoss", {"fsp_pairs": FSP_PAIRS}),
], ids=["SPKDLoss", "FSPLoss"])
def test_renamed_sp_and_fsp_follow_the_paper(theirs, ours, kwargs):
    io_dicts = torchdistill_io_dict()
    s, t = io_dicts["student"], io_dicts["teacher"]
    got = weighted_sum(ours, kwargs)(io_dicts, {}, None)
    assert not torch.allclose(got, weighted_sum(theirs, kwargs)(io_dicts, {}, None))
    if theirs == "SPKDLoss":
        expected = F.sp_loss(s["layer2"]["output"], t["layer2"]["output"])
    else:
        expected = sum(pair["weight"] * F.fsp_loss(
            [(s[pair["student_first"]["path"]]["input"],
              s[pair["student_second"]["path"]]["output"])],
            [(t[pair["teacher_first"]["path"]]["input"],
              t[pair["teacher_second"]["path"]]["output"])]) for pair in FSP_PAIRS.values())
    torch.testing.assert_close(got, 0.7 * expected)
    assert "differ" in getattr(plugin, ours).__doc__

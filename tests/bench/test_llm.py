"""The LLM rows: the llm suite, the liger peer provider (optional), the floor-based skip of
rows too slow for the time limit and the memory check of the eager providers."""

import sys
from dataclasses import replace

import pytest
import torch

from kdfast.bench import providers
from kdfast.bench.cli import PROVIDERS
from kdfast.bench.cores import CORES, EAGER_LOGIT_TENSORS, lm_head_inputs
from kdfast.bench.runner import run_core
from kdfast.bench.shapes import CLI_SUITES, SUITES, LmHeadShape

CORE = CORES["fused-linear-kd"]
TINY = SUITES["tiny"].lmhead[0]


def test_llm_suite_spans_a_small_llama_to_llama3_vocabularies():
    shapes = SUITES["llm"].lmhead
    assert "llm" in CLI_SUITES
    assert shapes[0] == LmHeadShape(1024, 512, 32000)
    assert LmHeadShape(4096, 2048, 128256) in shapes
    assert all(s.vocab >= 32000 for s in shapes)
    assert not SUITES["llm"].features and not SUITES["llm"].logits


def test_liger_is_a_provider_name_of_the_fused_linear_core():
    assert "liger" in PROVIDERS
    assert "liger" in providers.provider_names(CORE, torch.device("cpu"))
    assert "liger" not in providers.provider_names(CORES["kd"], torch.device("cpu"))


def test_liger_missing_is_not_available_with_the_reason(settings, env, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)
    settings.providers, settings.modes = ["native", "liger"], ("fwd",)
    rows = {r["provider"]: r for r in run_core(CORE, [TINY], settings, env)}
    assert rows["native"]["status"] == "ok", rows["native"]["note"]
    assert rows["liger"]["status"] == "not available"
    assert "pip install liger-kernel" in rows["liger"]["note"]


def test_liger_runs_the_same_loss_as_native(settings, env):
    pytest.importorskip("liger_kernel.chunked_loss",
                        reason="liger-kernel is not installed (optional: pip install "
                               "liger-kernel)")
    settings.providers, settings.modes, settings.repeats = ["native", "liger"], ("full",), 1
    rows = {r["provider"]: r for r in run_core(CORE, [TINY], settings, env)}
    assert rows["liger"]["status"] == "ok", rows["liger"]["note"]
    students, teachers = lm_head_inputs(TINY, torch.float32, torch.device("cpu"))
    fn = providers.build("liger", CORE, students, teachers).fn
    torch.testing.assert_close(fn(students, teachers),
                               CORE.loss(students, teachers, "native"), rtol=1e-5, atol=0)


def test_liger_unsupported_divergence_is_a_status():
    core = replace(CORE, options={"divergence": "tv"})
    students, teachers = lm_head_inputs(TINY, torch.float32, torch.device("cpu"))
    with pytest.raises(providers.Unavailable, match="no 'tv' divergence") as why:
        providers.build("liger", core, students, teachers)
    assert why.value.status == "unsupported"


def test_rows_over_the_time_limit_by_their_gemm_floor_are_skipped(settings, env):
    settings.providers, settings.modes = ["native"], ("fwd", "full")
    gemm = 2 * TINY.tokens * TINY.hidden * TINY.vocab  # fwd 2 GEMMs, full 4
    settings.matmul_flops_per_s = 3 * gemm / settings.time_limit  # fwd under, full over
    rows = {r["mode"]: r for r in run_core(CORE, [TINY], settings, env)}
    assert rows["fwd"]["status"] == "ok"
    assert rows["full"]["status"] == "skipped"
    assert "GEMM floor" in rows["full"]["note"]


def test_eager_provider_whose_logits_do_not_fit_is_skipped(monkeypatch):
    students, teachers = lm_head_inputs(TINY, torch.float32, torch.device("cpu"))
    need = EAGER_LOGIT_TENSORS * TINY.tokens * TINY.vocab * 4
    monkeypatch.setattr(providers, "memory_budget", lambda device: need / 2)
    with pytest.raises(providers.Unavailable, match="GiB of logits") as why:
        providers.build("reference", CORE, students, teachers)
    assert why.value.status == "skipped"
    assert providers.build("native", CORE, students, teachers).name == "native"

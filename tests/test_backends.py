import pytest
import torch

import kdfast
from kdfast import backends
from tests.helpers import randn


def test_available_backends_reports_reference():
    available = kdfast.available_backends()
    assert available["reference"] is True
    assert set(available) >= {"reference", "native", "triton"}


def test_explicit_unknown_backend_raises(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.choose("attention_map", "cuda", randn(1, 1, 1, 1))


def test_environment_variable_is_validated(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="KDFAST_BACKEND"):
        backends.choose("attention_map", None, randn(1, 1, 1, 1))


def test_environment_preference_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    backends._WARNED.discard("env:attention_map:triton")
    x = randn(1, 2, 3, 3)
    with pytest.warns(RuntimeWarning, match="falling back"):
        impl = backends.choose("attention_map", None, x)
    assert impl.backend in ("native", "reference")


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        backends.choose("attention_map", "triton", randn(1, 2, 3, 3))


def test_auto_prefers_native_on_cpu_when_built():
    impl = backends.choose("attention_map", "auto", randn(1, 2, 3, 3))
    expected = "native" if kdfast.available_backends()["native"] else "reference"
    assert impl.backend == expected


def test_reference_always_selectable():
    impl = backends.choose("attention_map", "reference", torch.randn(1, 1, 2, 2))
    assert impl.backend == "reference"

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast.functional import kd_loss
from kdfast.reference.kd import kd_loss as kd_reference
from tests.helpers import assert_rel_close, grads, randn


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 7), (1, 2), (5, 1000)])
def test_kd_loss_matches_reference(reduction, shape):
    s = randn(*shape, seed=0, requires_grad=True)
    t = randn(*shape, seed=1)
    out = kd_loss(s, t, temperature=3.0, reduction=reduction)
    per_sample = kd_reference(s, t, 3.0)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}
    assert_rel_close(out, expected[reduction], 1e-14, "value")
    assert_rel_close(grads(out.sum(), s, 1.7)[0], grads(expected[reduction].sum(), s, 1.7)[0],
                     1e-14, "gradient")


def test_default_temperature_is_four():
    s, t = randn(2, 5, seed=2), randn(2, 5, seed=3)
    torch.testing.assert_close(kd_loss(s, t), kd_reference(s, t, 4.0).mean())


def test_non_contiguous_and_float32_inputs():
    s = randn(7, 4, seed=4, dtype=torch.float32).t()  # (4, 7), non-contiguous
    t = randn(4, 7, seed=5, dtype=torch.float32)
    assert not s.is_contiguous()
    ref = kd_reference(s.double().contiguous(), t.double(), 4.0).mean()
    assert_rel_close(kd_loss(s, t), ref, 1e-6)


def test_teacher_with_and_without_requires_grad():
    s = randn(3, 6, seed=6, requires_grad=True)
    frozen = randn(3, 6, seed=7)
    g_frozen = torch.autograd.grad(kd_loss(s, frozen), s)[0]
    live = frozen.clone().requires_grad_()
    g_s, g_t = torch.autograd.grad(kd_loss(s, live), (s, live))
    torch.testing.assert_close(g_s, g_frozen)
    assert g_t.abs().sum() > 0  # the teacher is not detached by kd_loss
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, temperature=2.0), (s, live))


def test_module_matches_function_and_repr():
    s, t = randn(4, 5, seed=8), randn(4, 5, seed=9)
    module = kdfast.KDLoss(temperature=2.0, reduction="sum")
    torch.testing.assert_close(module(s, t), kd_loss(s, t, temperature=2.0, reduction="sum"))
    assert "temperature=2.0" in repr(module)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
    ({"temperature": "4"}, TypeError, "temperature must be a number"),
    ({"reduction": "batchmean"}, ValueError, "reduction must be one of"),
])
def test_bad_options(kwargs, error, match):
    s = randn(2, 3)
    with pytest.raises(error, match=match):
        kd_loss(s, s, **kwargs)
    with pytest.raises(error, match=match):
        kdfast.KDLoss(**kwargs)


def test_bad_inputs():
    s = randn(2, 5)
    with pytest.raises(ValueError, match="student_logits must be 2-D"):
        kd_loss(s[0], s)
    with pytest.raises(ValueError, match="teacher_logits must be 2-D"):
        kd_loss(s, s.view(2, 5, 1))
    with pytest.raises(ValueError, match="same batch size"):
        kd_loss(s, randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, randn(2, 6))
    with pytest.raises(TypeError, match="floating-point"):
        kd_loss(s, torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        kd_loss(randn(0, 5), randn(0, 5))
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        kd_loss(s, torch.empty(2, 5, device="meta", dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        kd_loss(s.numpy(), s)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_explicit_fused_backend_raises(backend):
    s = randn(2, 5)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run kd"):
        kd_loss(s, s, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        kd_loss(s, s, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_auto_and_reference_backends(backend):
    s, t = randn(2, 5, seed=10), randn(2, 5, seed=11)
    torch.testing.assert_close(kd_loss(s, t, backend=backend), kd_reference(s, t, 4.0).mean())


def test_environment_native_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "native")
    backends._WARNED.discard("env:kd:native")
    s, t = randn(2, 5, seed=12), randn(2, 5, seed=13)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = kd_loss(s, t)
    torch.testing.assert_close(out, kd_reference(s, t, 4.0).mean())

import pytest
import torch

import kdfast
from kdfast.functional import srd_loss
from kdfast.ops.softmax_kl import CORE
from kdfast.reference.softmax_kl import softmax_kl
from kdfast.reference.srd import srd_feature_term
from tests.helpers import assert_rel_close, docstring_example_loss, randn, spy_on_backend


def inputs(seed=0):
    return (randn(4, 6, seed=seed), randn(4, 6, seed=seed + 1), randn(4, 5, seed=seed + 2),
            randn(4, 5, seed=seed + 3))


@pytest.mark.parametrize("example", [srd_loss, kdfast.SRDLoss])
def test_docstring_example_runs(example):
    docstring_example_loss(example)


def test_rows_share_the_feature_term_and_hold_their_own_kl():
    f_s, f_t, z_s, z_t = inputs()
    rows = srd_loss(f_s, f_t, z_s, z_t, exponent=2.0, temperature=3.0, reduction="none")
    kl = softmax_kl(z_s, z_t, 3.0) / 9.0
    torch.testing.assert_close(rows - kl, srd_feature_term(f_s, f_t, 2.0).expand(4))
    torch.testing.assert_close(srd_loss(f_s, f_t, z_s, z_t, exponent=2.0, temperature=3.0),
                               rows.mean())
    torch.testing.assert_close(srd_loss(f_s, f_t, z_s, z_t, exponent=2.0, temperature=3.0,
                                        reduction="sum"), rows.sum())


def test_native_kl_runs_and_matches_the_reference_with_gradients(monkeypatch):
    calls = spy_on_backend(monkeypatch, CORE, "native")
    results = []
    for backend in ("native", "reference"):
        leaves = [x.requires_grad_(True) for x in inputs(seed=4)]
        out = srd_loss(*leaves, exponent=1.5, temperature=2.0, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves)))
    assert len(calls) == 1  # the native softmax_kl core ran once, for backend="native" only
    for got, want in zip(*results, strict=True):
        assert_rel_close(got, want, 1e-12)


def test_module_options_take_effect():
    f_s, f_t, z_s, z_t = inputs(seed=8)
    loss = kdfast.SRDLoss()
    loss.exponent, loss.temperature, loss.reduction = 3.0, 2.0, "none"
    torch.testing.assert_close(loss(f_s, f_t, z_s, z_t),
                               srd_loss(f_s, f_t, z_s, z_t, exponent=3.0, temperature=2.0,
                                        reduction="none"))


def test_errors_name_the_input_and_the_fix():
    f_s, f_t, z_s, z_t = inputs()
    with pytest.raises(ValueError, match="student and student_logits must have the same batch"):
        srd_loss(f_s, f_t, z_s[:3], z_t[:3])
    with pytest.raises(ValueError, match="student and teacher must have the same shape.*projector"):
        srd_loss(f_s, f_t[:, :4], z_s, z_t)
    with pytest.raises(ValueError, match="student_logits and teacher_logits must have the same"):
        srd_loss(f_s, f_t, z_s, z_t[:, :4])

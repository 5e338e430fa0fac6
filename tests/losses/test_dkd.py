import math

import pytest
import torch

import kdfast
from kdfast.functional import dkd_loss, kd_loss
from kdfast.ops.dkd import fused_dkd_applies
from kdfast.reference.dkd import dkd_loss as dkd_reference
from tests.helpers import REDUCTIONS, assert_matches_reference, assert_rel_close, randn
from tests.reference.test_dkd import mdistiller_dkd

LABELS = torch.tensor([0, 6, 3, 3, 9])


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backends_match_the_reference(backend, dtype):
    s = randn(5, 10, seed=0).to(dtype).requires_grad_()
    t = (randn(5, 10, seed=1) * 3).to(dtype).requires_grad_()
    assert_matches_reference(
        lambda a, b: dkd_loss(a, b, LABELS, reduction="none", backend=backend),
        lambda a, b: dkd_reference(a, b, LABELS), (s, t))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_agrees_with_mdistillers_minus_1000_trick(backend):
    # The gold column at -inf (exact) against mdistiller's z/T - 1000 at ordinary logits.
    s = randn(5, 10, seed=2, dtype=torch.float32, requires_grad=True)
    t = randn(5, 10, seed=3, dtype=torch.float32) * 4
    ours = dkd_loss(s, t, LABELS, reduction="none", backend=backend)
    theirs = mdistiller_dkd(s, t, LABELS, 1.0, 8.0, 4.0)
    assert_rel_close(ours, theirs, 1e-6, "loss")
    assert_rel_close(torch.autograd.grad(ours.sum(), s)[0],
                     torch.autograd.grad(theirs.sum(), s)[0], 1e-6, "gradient")


def test_defaults_are_mdistillers_and_the_warmup_factor_scales():
    s, t = randn(5, 10, seed=4), randn(5, 10, seed=5)
    expected = dkd_reference(s, t, LABELS, 4.0, 1.0, 8.0).mean()
    torch.testing.assert_close(dkd_loss(s, t, LABELS), expected)
    torch.testing.assert_close(dkd_loss(s, t, LABELS, warmup_factor=0.25), 0.25 * expected)
    assert dkd_loss(s, t, LABELS, warmup_factor=0.0) == 0


def test_two_classes_is_kd():
    s, t = randn(4, 2, seed=6), randn(4, 2, seed=7)
    y = torch.tensor([1, 0, 0, 1])
    torch.testing.assert_close(dkd_loss(s, t, y), kd_loss(s, t))


def test_rejects_one_class_and_bad_targets():
    s, t = randn(3, 1, seed=8), randn(3, 1, seed=9)
    with pytest.raises(ValueError, match="student_logits has 1 class.*at least 2"):
        dkd_loss(s, t, torch.zeros(3, dtype=torch.long))
    s, t = randn(3, 4, seed=8), randn(3, 4, seed=9)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\]"):
        dkd_loss(s, t, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        dkd_loss(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        dkd_loss(s, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_warmup_factor_is_an_attribute(reduction):
    s, t = randn(5, 10, seed=10), randn(5, 10, seed=11)
    criterion = kdfast.DKDLoss(reduction=reduction)
    criterion.warmup_factor = min(3 / 20, 1.0)
    torch.testing.assert_close(criterion(s, t, LABELS),
                               dkd_loss(s, t, LABELS, warmup_factor=0.15, reduction=reduction))


FUSED_SHAPES = [(1, 2), (3, 3), (5, 1000), (2, 70001)]


def value_noise(rows: int, cols: int, temperature: float, weight: float) -> float:
    """tests/fuzz_cases.py softmax_value_noise for reduction "none": 4 float32 ulps of
    T² · weight · log L per row (the norm over the rows)."""
    eps = torch.finfo(torch.float32).eps
    return 4 * eps * temperature**2 * weight * math.log(max(cols, 2)) * math.sqrt(rows)


def fused_inputs(rows: int, cols: int, dtype: torch.dtype, scale: float = 3.0):
    """Student (requires grad), frozen teacher and labels: the kdfast::dkd pass's case."""
    s = (randn(rows, cols, seed=4) * scale).to(dtype).requires_grad_()
    t = (randn(rows, cols, seed=5) * scale).to(dtype)
    labels = torch.randint(cols, (rows,), generator=torch.Generator().manual_seed(rows + cols))
    assert fused_dkd_applies(s, t)
    return s, t, labels


@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fused_native_pass_matches_the_reference(shape, dtype):
    s, t, labels = fused_inputs(*shape, dtype)
    options = {"temperature": 3.0, "alpha": 1.5, "beta": 8.0}
    assert_matches_reference(
        lambda a, b: dkd_loss(a, b, labels, reduction="none", backend="native",
                              warmup_factor=0.7, **options),
        lambda a, b: 0.7 * dkd_reference(a, b, labels, **options), (s, t),
        value_atol=value_noise(*shape, 3.0, 0.7 * 9.5))


@pytest.mark.parametrize("case", ["large logits", "masked classes", "masked under mass",
                                  "confident teacher"])
def test_fused_native_pass_special_values_follow_the_reference(case):
    s, t, labels = fused_inputs(4, 37, torch.float64)
    s, t = s.detach().clone(), t.clone()
    if case == "large logits":
        s[:, 1], t[:, 2] = 1e4, -1e4
    elif case == "masked classes":  # a class at -inf in both rows: no mass, no gradient
        s[:, 5] = t[:, 5] = float("-inf")
    elif case == "masked under mass":  # the student rules out a class the teacher backs: inf
        s[0, (labels[0] + 1) % 37] = float("-inf")
    else:  # p_t,g -> 1: log(1 - p_g) exact in log space
        t[torch.arange(4), labels] = 60.0
    s.requires_grad_()
    ours = dkd_loss(s, t, labels, reduction="none", backend="native")
    theirs = dkd_reference(s, t, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    if case != "masked under mass":
        g_ours, = torch.autograd.grad(ours.sum(), s)
        g_theirs, = torch.autograd.grad(theirs.sum(), s)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-11, atol=1e-13)


def test_fused_native_pass_keeps_one_gradient_and_reruns_for_a_second_backward():
    s, t, labels = fused_inputs(6, 257, torch.float32)
    loss = dkd_loss(s, t, labels, backend="native")
    node = loss.grad_fn.next_functions[0][0]  # the mean's input: the fused pass
    assert node.kept_gradient.shape == s.shape
    first, = torch.autograd.grad(loss, s, retain_graph=True)
    assert node.kept_gradient is None
    second, = torch.autograd.grad(loss, s)
    assert torch.equal(first, second)
    with torch.no_grad():
        assert dkd_loss(s, t, labels, backend="native").grad_fn is None


def test_teacher_gradient_takes_the_composed_path():
    s, t, labels = fused_inputs(3, 11, torch.float64)
    t.requires_grad_()
    assert not fused_dkd_applies(s, t)
    assert_matches_reference(
        lambda a, b: dkd_loss(a, b, labels, reduction="none", backend="native"),
        lambda a, b: dkd_reference(a, b, labels), (s, t))


def test_native_operator_rejects_bad_targets():
    s, t, _ = fused_inputs(2, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 4\]"):
        torch.ops.kdfast.dkd(s.detach(), t, torch.tensor([0, 5]), 4.0, 1.0, 8.0, True)
    with pytest.raises(RuntimeError, match="targets must be"):
        torch.ops.kdfast.dkd(s.detach(), t, torch.tensor([0.0, 1.0]), 4.0, 1.0, 8.0, True)

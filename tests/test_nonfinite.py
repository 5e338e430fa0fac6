"""Non-finite and very large inputs, every loss on every CPU backend.

* A NaN or +inf in the student or, separately, in the teacher makes the loss NaN or ±inf:
  nothing masks, clamps or floors it away (``NaN > 0`` is False, ``fmax(NaN, eps)`` is eps,
  a degenerate-pair mask must not take a NaN distance for a zero one).
* Finite float32 inputs whose squared norms overflow (|x| ≳ 1e19/√n) still give the right
  value where the loss itself is representable: normalisations never overflow (the reference's
  ``normalize``, the native kernels' ``norm_from_sum_sq``), so no backend returns the silent 0
  of a norm that became inf. Native NST at such sizes is in tests/ops/test_mmd.py, the Triton
  backend in tests/triton/test_nonfinite.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast import functional as kf
from kdfast.reference import numerics
from tests.helpers import assert_rel_close, randn

NEEDS_NATIVE = pytest.mark.skipif(not kdfast.available_backends()["native"],
                                  reason="native extension not built")
BACKENDS = ["reference", pytest.param("native", marks=NEEDS_NATIVE)]

with torch.random.fork_rng():  # fixed modules without disturbing the global generator
    torch.manual_seed(0)
    DISCRIMINATOR = kdfast.ConditionalDiscriminator(5, hidden=8)
    STUDENT_NET = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    TEACHER_NET = nn.Linear(4, 5).requires_grad_(False)


def labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 5


def gradient_at(student_poison, teacher_poison, backend):
    """gradient_at_loss with the poisons added to logits computed from the inputs."""
    x = randn(student_poison.shape[0], 4, dtype=torch.float32, seed=7, requires_grad=True)
    return kf.gradient_at_loss(STUDENT_NET(x) + student_poison, TEACHER_NET(x) + teacher_poison,
                               x, labels(len(x)), backend=backend)


@dataclass(frozen=True)
class Loss:
    id: str
    call: Callable  # (student, teacher, backend) -> scalar loss
    student: tuple[int, ...]
    teacher: tuple[int, ...]
    native: bool = False  # whether its core has a native implementation
    poison_only: bool = False  # the inputs are poisons added to fixed logits (gradient AT)

    def inputs(self, seed: int = 0):
        if self.poison_only:
            return torch.zeros(self.student), torch.zeros(self.teacher)
        return (randn(*self.student, dtype=torch.float32, seed=seed),
                randn(*self.teacher, dtype=torch.float32, seed=seed + 1))


FEATURES_S, FEATURES_T = (2, 3, 4, 5), (2, 4, 4, 5)
LOGITS = (3, 5)
SECOND = randn(2, 3, 4, 5, dtype=torch.float32, seed=99)  # the other map of each FSP pair


def nst(**options):
    return lambda s, t, b: kf.nst_loss(s, t, backend=b, **options)


LOSSES = [
    Loss("kd", lambda s, t, b: kf.kd_loss(s, t, backend=b), LOGITS, LOGITS),
    Loss("dml", lambda s, t, b: kf.dml_loss(s, [t], backend=b), LOGITS, LOGITS),
    Loss("ban", lambda s, t, b: kf.ban_generation_loss(s, t, backend=b), LOGITS, LOGITS),
    Loss("at", lambda s, t, b: kf.at_loss(s, t, backend=b), FEATURES_S, FEATURES_T, True),
    Loss("at-p3-paper", lambda s, t, b: kf.at_loss(s, t, p=3.0, mode="paper", backend=b),
         FEATURES_S, FEATURES_T, True),
    Loss("nst-poly", nst(), FEATURES_S, FEATURES_T, True),
    Loss("nst-poly-feature-grams", nst(), (2, 8, 2, 2), (2, 8, 2, 2), True),
    Loss("nst-poly3", nst(degree=3, coef=0.5), FEATURES_S, FEATURES_T, True),
    Loss("nst-linear", nst(kernel="linear"), FEATURES_S, FEATURES_T, True),
    Loss("nst-rbf", nst(kernel="rbf"), FEATURES_S, FEATURES_T, True),
    Loss("nst-rbf-multi", nst(kernel="rbf", sigma2=[0.5, 2.0]), FEATURES_S, FEATURES_T, True),
    Loss("nst-rbf-mean", nst(kernel="rbf", sigma2="mean"), FEATURES_S, FEATURES_T, True),
    Loss("nst-rbf-no-tt", nst(kernel="rbf", teacher_term=False), FEATURES_S, FEATURES_T, True),
    Loss("sp", lambda s, t, b: kf.sp_loss(s, t, backend=b), (3, 3, 4, 5), (3, 2, 2, 2), True),
    Loss("fsp", lambda s, t, b: kf.fsp_loss([(s, SECOND)], [(t, SECOND)], backend=b),
         FEATURES_S, FEATURES_S, True),
    Loss("rkd", lambda s, t, b: kf.rkd_loss(s, t, backend=b), (4, 6), (4, 7)),
    Loss("rkd-distance", lambda s, t, b: kf.rkd_loss(s, t, angle_weight=0.0, backend=b),
         (4, 6), (4, 7)),
    Loss("rkd-angle", lambda s, t, b: kf.rkd_loss(s, t, distance_weight=0.0, backend=b),
         (4, 6), (4, 7)),
    Loss("ab", lambda s, t, b: kf.ab_loss(s, t, backend=b), FEATURES_S, FEATURES_S),
    Loss("fitnet", lambda s, t, b: kf.fitnet_loss(s, t, backend=b), FEATURES_S, FEATURES_S),
    Loss("gradient-at", gradient_at, LOGITS, LOGITS, poison_only=True),
    Loss("discriminator", lambda s, t, b: kf.discriminator_loss(DISCRIMINATOR, s, t,
                                                                 labels(len(s))),
         LOGITS, LOGITS),
    Loss("adversarial-student", lambda s, t, b: kf.adversarial_student_loss(
        DISCRIMINATOR, s, t, labels(len(s))), LOGITS, LOGITS),
    Loss("dkd", lambda s, t, b: kf.dkd_loss(s, t, labels(len(s)), backend=b), LOGITS, LOGITS,
         True),
    Loss("lskd", lambda s, t, b: kf.lskd_loss(s, t, backend=b), LOGITS, LOGITS, True),
    Loss("dist", lambda s, t, b: kf.dist_loss(s, t, backend=b), LOGITS, LOGITS),
    Loss("wsld", lambda s, t, b: kf.wsld_loss(s, t, labels(len(s)), backend=b), LOGITS,
         LOGITS, True),
]


def poisoned(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with one entry (inside the first sample, off its first element) set to value."""
    x = x.clone()
    x.view(-1)[min(3, x.numel() - 1)] = value
    return x


def loss_cases():
    for loss in LOSSES:
        yield pytest.param(loss, "reference", id=f"{loss.id}-reference")
        if loss.native:
            yield pytest.param(loss, "native", id=f"{loss.id}-native", marks=NEEDS_NATIVE)


@pytest.mark.parametrize("loss,backend", loss_cases())
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_input_gives_a_non_finite_loss(loss, backend, side, value):
    student, teacher = loss.inputs()
    if side == "student":
        student = poisoned(student, value)
    else:
        teacher = poisoned(teacher, value)
    out = loss.call(student.requires_grad_(), teacher, backend)
    assert not torch.isfinite(out), f"{loss.id} with {value} in the {side}: finite {out.item()}"


@pytest.mark.parametrize("loss,backend", loss_cases())
def test_the_table_inputs_are_finite_without_poison(loss, backend):
    """The table above is only meaningful if the clean inputs give a finite loss."""
    student, teacher = loss.inputs()
    assert torch.isfinite(loss.call(student, teacher, backend))


# --- large finite inputs ---------------------------------------------------------------------

def test_normalize_equals_f_normalize_bitwise_where_that_is_finite():
    x = randn(6, 9, dtype=torch.float32, seed=1)
    x[1] = 0  # an all-zero row: x / eps
    x[2] *= 1e-14  # below eps
    x[3] *= 1e6
    assert torch.equal(numerics.normalize(x, 1), F.normalize(x, dim=1))
    assert torch.equal(numerics.vector_norm(x, 1), torch.linalg.vector_norm(x, dim=1))


def test_normalize_does_not_overflow_where_f_normalize_returns_zeros():
    x = randn(3, 20, dtype=torch.float32, seed=2) * 1e19
    assert torch.all(F.normalize(x, dim=1) == 0)  # the silent failure normalize avoids
    expected = F.normalize(x.double(), dim=1)
    assert_rel_close(numerics.normalize(x, 1), expected, 1e-6, "normalize")
    assert_rel_close(numerics.vector_norm(x, 1), torch.linalg.vector_norm(x.double(), dim=1),
                     1e-6, "vector_norm")


def test_normalize_keeps_nan_and_inf_non_finite():
    x = randn(2, 5, dtype=torch.float32, seed=3)
    x[0, 1], x[1, 2] = math.nan, math.inf
    out = numerics.normalize(x, 1)
    assert torch.isnan(out[0]).all() and torch.isnan(out[1, 2])


def test_normalize_gradient_matches_f_normalize():
    x = randn(4, 6, seed=4, requires_grad=True)
    weights = randn(4, 6, seed=5)
    ours = torch.autograd.grad((numerics.normalize(x, 1) * weights).sum(), x)[0]
    theirs = torch.autograd.grad((F.normalize(x, dim=1) * weights).sum(), x)[0]
    assert_rel_close(ours, theirs, 1e-14, "gradient")
    assert torch.autograd.gradcheck(lambda z: numerics.normalize(z, 1), (x,))


LARGE = [
    # (loss, fp32 scale): Σ x² (NST, AT's ‖Q‖²: Q ~ x², SP's row norms: A ~ x²·D) overflows
    # float32 at these scales while the loss is representable.
    pytest.param(lambda s, t, b: kf.at_loss(s, t, backend=b), 2.0**40, id="at-2^40"),
    pytest.param(lambda s, t, b: kf.at_loss(s, t, backend=b), 2.0**62, id="at-2^62"),
    pytest.param(lambda s, t, b: kf.at_loss(s, t, p=1.0, mode="paper", backend=b), 2.0**100,
                 id="at-p1-paper-2^100"),
    pytest.param(lambda s, t, b: kf.sp_loss(s, t, backend=b), 2.0**40, id="sp-2^40"),
    pytest.param(lambda s, t, b: kf.sp_loss(s, t, backend=b), 2.0**60, id="sp-2^60"),
    pytest.param(nst(), 2.0**64, id="nst-poly-2^64"),
    pytest.param(nst(kernel="rbf", sigma2="mean"), 2.0**64, id="nst-rbf-mean-2^64"),
]


@pytest.mark.parametrize("loss,scale", LARGE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_finite_inputs_give_the_float64_value_and_gradient(loss, scale, backend):
    s = randn(*FEATURES_S, seed=10)
    t = randn(*FEATURES_T, seed=11)
    expected = loss(s.requires_grad_(), t, "reference")  # float64: nothing overflows
    (expected_grad,) = torch.autograd.grad(expected, s)
    student = (s.detach() * scale).float().requires_grad_()
    out = loss(student, (t * scale).float(), backend)
    (grad,) = torch.autograd.grad(out, student)
    assert_rel_close(out, expected, 1e-5, "value")
    assert_rel_close(grad * scale, expected_grad, 1e-4, "gradient")  # d/d(scale·s)


# --- masked logits (−inf at the same classes in student and teacher) -------------------------

CLASS_MASK = torch.tensor([[False, True, False, True, False],
                           [False, False, False, False, True],
                           [True, False, False, False, False]])


@pytest.mark.parametrize("loss", [
    pytest.param(lambda s, t: kf.kd_loss(s, t, temperature=2.0, reduction="none"), id="kd"),
    pytest.param(lambda s, t: kf.dml_loss(s, [t], temperature=2.0, reduction="none"),
                 id="dml"),
    pytest.param(lambda s, t: kf.ban_generation_loss(s, t, temperature=2.0, reduction="none"),
                 id="ban"),
])
def test_logit_losses_on_masked_logits_are_the_kl_of_the_kept_classes(loss):
    s = randn(*LOGITS, seed=40).masked_fill(CLASS_MASK, -math.inf).requires_grad_()
    t = randn(*LOGITS, seed=41).masked_fill(CLASS_MASK, -math.inf)
    out = loss(s, t)
    (grad,) = torch.autograd.grad(out.sum(), s)
    for row in range(LOGITS[0]):
        keep = ~CLASS_MASK[row]
        expected = kf.kd_loss(s[row:row + 1, keep], t[row:row + 1, keep], temperature=2.0)
        torch.testing.assert_close(out[row], expected)
    assert torch.isfinite(grad).all() and torch.all(grad[CLASS_MASK] == 0)


class Shift(nn.Module):
    """A "generation" mapping masked logits to logits: x + a fixed finite shift."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.shift = randn(*LOGITS, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def test_born_again_ensemble_on_masked_logits():
    """Classes masked in every generation: probability 0, log-probability −inf, gradient 0."""
    x = randn(*LOGITS, seed=42).masked_fill(CLASS_MASK, -math.inf).requires_grad_()
    models = [Shift(43 + k) for k in range(3)]
    mean_probs = kdfast.BornAgainEnsemble(models)(x)
    log_mean = kdfast.BornAgainEnsemble(models, log_probs=True)(x)
    assert torch.all(mean_probs[CLASS_MASK] == 0) and torch.all(log_mean[CLASS_MASK] == -math.inf)
    expected = sum(F.softmax(x.detach() + m.shift, 1) for m in models) / len(models)
    torch.testing.assert_close(mean_probs, expected)
    kept = torch.where(CLASS_MASK, 0.0, log_mean)
    (grad,) = torch.autograd.grad((kept * randn(*LOGITS, seed=46)).sum() + mean_probs.sum(), x)
    assert torch.isfinite(grad).all() and torch.all(grad[CLASS_MASK] == 0)

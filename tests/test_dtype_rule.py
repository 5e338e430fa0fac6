"""One dtype rule for every loss and backend, over every (student, teacher) dtype pair.

The rule: all tensor inputs of a loss are brought to their promoted dtype
(``torch.promote_types``) before dispatch, the loss is computed there with at least fp32
accumulation and returned in the accumulation dtype of that promoted dtype (fp64 for fp64,
else fp32), and each input's gradient comes back in that input's own dtype.

Each case is checked on every backend it has (reference, native) for each of the 16 pairs
of {fp16, bf16, fp32, fp64}: it runs, returns the rule's dtype, its value matches the float64
reference of the same (rounded) inputs within the tolerance of the promoted dtype, and its
gradients have each input's dtype and match the float64 ones.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import kdfast
from kdfast import functional as KF
from kdfast._precision import accumulation_dtype
from kdfast.backends import available_backends
from tests.helpers import assert_rel_close, dtype_tolerance, randn, rel_err

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABELS = torch.tensor([0, 2, 1])

with torch.random.fork_rng():  # fixed networks without disturbing the global generator
    torch.manual_seed(0)
    DISCRIMINATOR = kdfast.ConditionalDiscriminator(4, hidden=6)
    STUDENT_NET = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    TEACHER_NET = nn.Linear(4, 3).requires_grad_(False)


@functools.cache
def in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (``Module.to`` would change the shared one)."""
    return copy.deepcopy(module).to(dtype)


def discriminator(dtype: torch.dtype) -> nn.Module:
    """The discriminator in ``dtype``: it is the caller's module and runs in its own dtype,
    which must be the logits' promoted dtype."""
    return in_dtype(DISCRIMINATOR, dtype)


@dataclass
class Case:
    id: str
    shapes: tuple[tuple[int, ...], ...]  # one tensor input per shape
    teacher: tuple[bool, ...]  # which inputs take the teacher's dtype (else the student's)
    loss: Callable  # loss(tensors, backend)
    backends: tuple[str | None, ...] = ("reference",)


FEATURES_S, FEATURES_T = (2, 3, 4, 4), (2, 5, 4, 4)
PAIR = (False, True)

CASES = [
    Case("at", (FEATURES_S, FEATURES_T), PAIR,
         lambda x, b: KF.at_loss(*x, backend=b), ("reference", "native")),
    Case("nst-poly", (FEATURES_S, FEATURES_T), PAIR,
         lambda x, b: KF.nst_loss(*x, backend=b), ("reference", "native")),
    Case("nst-rbf-mean", (FEATURES_S, FEATURES_T), PAIR,
         lambda x, b: KF.nst_loss(*x, kernel="rbf", sigma2="mean", backend=b),
         ("reference", "native")),
    Case("sp", (FEATURES_S, (2, 5, 2, 2)), PAIR,
         lambda x, b: KF.sp_loss(*x, backend=b), ("reference", "native")),
    Case("fsp", ((2, 3, 4, 4), (2, 5, 4, 4), (2, 3, 4, 4), (2, 5, 2, 2)),
         (False, False, True, True),
         lambda x, b: KF.fsp_loss([(x[0], x[1])], [(x[2], x[3])], backend=b),
         ("reference", "native")),
    Case("ab", (FEATURES_S, FEATURES_S), PAIR, lambda x, b: KF.ab_loss(*x, backend=b)),
    Case("fitnet", (FEATURES_S, FEATURES_S), PAIR,
         lambda x, b: KF.fitnet_loss(*x, backend=b)),
    Case("rkd", ((3, 4), (3, 6)), PAIR, lambda x, b: KF.rkd_loss(*x, backend=b)),
    Case("kd", ((3, 4), (3, 4)), PAIR, lambda x, b: KF.kd_loss(*x, backend=b)),
    Case("dml", ((3, 4), (3, 4), (3, 4)), (False, True, True),
         lambda x, b: KF.dml_loss(x[0], list(x[1:]), backend=b)),
    Case("ban", ((3, 4), (3, 4)), PAIR,
         lambda x, b: KF.ban_generation_loss(*x, LABELS, label_weight=0.5, backend=b)),
    Case("discriminator", ((3, 4), (3, 4)), PAIR,
         lambda x, b: KF.discriminator_loss(
             discriminator(torch.promote_types(x[0].dtype, x[1].dtype)), *x, LABELS),
         (None,)),
    Case("adversarial_student", ((3, 4), (3, 4)), PAIR,
         lambda x, b: KF.adversarial_student_loss(
             discriminator(torch.promote_types(x[0].dtype, x[1].dtype)), *x, LABELS),
         (None,)),
    Case("pkt", ((3, 4), (3, 6)), PAIR, lambda x, b: KF.pkt_loss(*x, backend=b)),
    Case("cc", ((3, 4), (3, 6)), PAIR, lambda x, b: KF.cc_loss(*x, backend=b)),
    Case("cc-repdistiller", ((3, 4), (3, 4)), PAIR,
         lambda x, b: KF.cc_loss(*x, variant="repdistiller", backend=b)),
    Case("vid", (FEATURES_S, FEATURES_S), PAIR,  # variances exact in every dtype
         lambda x, b: KF.vid_loss(*x, torch.tensor([0.5, 1.0, 2.0], dtype=x[0].dtype),
                                  backend=b)),
    Case("ft", (FEATURES_S, FEATURES_T), PAIR, lambda x, b: KF.ft_loss(*x, backend=b)),
    Case("kdsvd", ((2, 3, 4, 4), (2, 4, 2, 2), (2, 3, 4, 4), (2, 4, 2, 2)),
         (False, False, True, True),
         lambda x, b: KF.kdsvd_loss(x[:2], x[2:], backend=b)),
    Case("srd", ((3, 4), (3, 4), (3, 5), (3, 5)), (False, True, False, True),
         lambda x, b: KF.srd_loss(*x, backend=b), ("reference", "native")),
    Case("dkd", ((3, 4), (3, 4)), PAIR, lambda x, b: KF.dkd_loss(*x, LABELS, backend=b),
         ("reference", "native")),
    Case("lskd", ((3, 4), (3, 4)), PAIR, lambda x, b: KF.lskd_loss(*x, backend=b),
         ("reference", "native")),
    Case("dist", ((3, 4), (3, 4)), PAIR, lambda x, b: KF.dist_loss(*x, backend=b)),
    Case("wsld", ((3, 4), (3, 4)), PAIR, lambda x, b: KF.wsld_loss(*x, LABELS, backend=b),
         ("reference", "native")),
]


def each_case_backend_and_pair():
    params = []
    for case in CASES:
        for backend, (s_dtype, t_dtype) in itertools.product(
                case.backends, itertools.product(DTYPES, DTYPES)):
            names = f"{str(s_dtype)[6:]}-{str(t_dtype)[6:]}"
            params.append(pytest.param(case, backend, s_dtype, t_dtype,
                                       id=f"{case.id}-{backend or 'only'}-{names}"))
    return pytest.mark.parametrize("case,backend,s_dtype,t_dtype", params)


def make_inputs(case: Case, s_dtype, t_dtype) -> list[torch.Tensor]:
    """Fresh random leaves, each in its side's dtype (rounded there, so float64 copies of them
    hold exactly the same values)."""
    return [randn(*shape, seed=i).to(t_dtype if teacher else s_dtype).requires_grad_(True)
            for i, (shape, teacher) in enumerate(zip(case.shapes, case.teacher, strict=True))]


def float64_copies(tensors) -> list[torch.Tensor]:
    return [x.detach().double().requires_grad_(True) for x in tensors]


def gradients(out: torch.Tensor, tensors) -> tuple:
    return torch.autograd.grad(out, tensors, allow_unused=True)


def flat_gradients(loss: Callable) -> Callable:
    """``loss`` turned into the concatenation of its input gradients (for dtype_tolerance)."""
    def run(*tensors):
        leaves = [x.detach().requires_grad_(True) for x in tensors]
        found = [g.double().reshape(-1) for g in gradients(loss(leaves), leaves)
                 if g is not None]
        return torch.cat(found) if found else torch.zeros(0, dtype=torch.float64)
    return run


def needs_native(backend):
    if backend == "native" and not available_backends()["native"]:
        pytest.skip("the native extension is not built")


CASES_BY_ID = {case.id: case for case in CASES}


def reference_of(case: Case) -> Callable:
    return lambda tensors: case.loss(tensors, case.backends[0])  # "reference", or None


@functools.cache
def tolerances(case_id: str, s_dtype, t_dtype) -> tuple[float, float]:
    """Value and gradient tolerances for these inputs computed in their promoted dtype: twice
    what the reference itself loses there, plus 1e-3 (shared by the case's backends)."""
    case = CASES_BY_ID[case_id]
    promoted = torch.promote_types(s_dtype, t_dtype)
    exact_inputs = float64_copies(make_inputs(case, s_dtype, t_dtype))
    reference = reference_of(case)
    return (dtype_tolerance(lambda *x: reference(list(x)), exact_inputs, promoted),
            dtype_tolerance(flat_gradients(reference), exact_inputs, promoted))


@each_case_backend_and_pair()
def test_every_loss_follows_the_dtype_rule(case, backend, s_dtype, t_dtype):
    needs_native(backend)
    promoted = torch.promote_types(s_dtype, t_dtype)
    tensors = make_inputs(case, s_dtype, t_dtype)
    out = case.loss(tensors, backend)
    assert out.dtype == accumulation_dtype(promoted), (
        f"{s_dtype} student with {t_dtype} teacher returned {out.dtype}")

    exact_inputs = float64_copies(tensors)
    exact = reference_of(case)(exact_inputs)
    tolerance, grad_tolerance = tolerances(case.id, s_dtype, t_dtype)
    assert_rel_close(out, exact, tolerance, "value")

    grads, exact_grads = gradients(out, tensors), gradients(exact, exact_inputs)
    for k, (x, grad, exact_grad) in enumerate(zip(tensors, grads, exact_grads, strict=True)):
        assert (grad is None) == (exact_grad is None), f"input {k}: gradient presence"
        if grad is None:
            continue
        assert grad.dtype == x.dtype, f"input {k} ({x.dtype}) got a {grad.dtype} gradient"
        rounding = torch.finfo(x.dtype).eps  # the gradient is rounded to the input's dtype
        assert_rel_close(grad, exact_grad, grad_tolerance + rounding, f"gradient {k}")


def network_logits(x: torch.Tensor, s_dtype, t_dtype):
    """Logits of the student network in ``s_dtype`` and the teacher's in ``t_dtype``."""
    student = in_dtype(STUDENT_NET, s_dtype)(x.to(s_dtype))
    teacher = in_dtype(TEACHER_NET, t_dtype)(x.to(t_dtype))
    return student, teacher


@pytest.mark.parametrize("s_dtype,t_dtype", [
    pytest.param(s, t, id=f"{str(s)[6:]}-{str(t)[6:]}") for s, t in itertools.product(
        DTYPES, DTYPES)])
def test_gradient_attention_follows_the_dtype_rule(s_dtype, t_dtype):
    """Gradient AT's inputs are logits computed from ``inputs`` by a student and a teacher
    network that may run in different dtypes (inputs in the student's)."""
    x = randn(3, 4, seed=5).to(s_dtype).requires_grad_(True)
    out = KF.gradient_at_loss(*network_logits(x, s_dtype, t_dtype), x, LABELS)
    assert out.dtype == accumulation_dtype(torch.promote_types(s_dtype, t_dtype))
    (grad,) = torch.autograd.grad(out, x)
    assert grad.dtype == s_dtype

    def loss_with_networks_in(dtype: torch.dtype) -> torch.Tensor:
        x64 = x.detach().double().requires_grad_(True)
        return KF.gradient_at_loss(*network_logits(x64, dtype, dtype), x64, LABELS)

    exact = loss_with_networks_in(torch.float64)
    # The networks run in the inputs' own dtypes: the least precise one bounds the error.
    least = max((s_dtype, t_dtype), key=lambda d: torch.finfo(d).eps)
    tolerance = 2.0 * rel_err(loss_with_networks_in(least), exact) + 1e-3
    assert_rel_close(out, exact, tolerance, "value")


def test_mixed_teacher_reaches_the_fused_core_in_one_dtype(monkeypatch):
    """What a fused core sees: the promoted dtype (so Triton's one-dtype ``supports`` and the
    native kernels' one-dtype check both pass)."""
    from kdfast import backends
    seen = []
    original = backends.choose

    def spy(core, backend, *tensors):
        seen.append((core, tuple(t.dtype for t in tensors)))
        return original(core, backend, *tensors)

    monkeypatch.setattr(backends, "choose", spy)
    s = randn(2, 3, 4, 4).float()
    t = randn(2, 5, 4, 4).to(torch.bfloat16)
    KF.nst_loss(s, t)
    KF.at_loss(s, t)
    KF.sp_loss(s, t)
    KF.fsp_loss([(s, s)], [(t[:, :3], t[:, :3])])
    assert seen and all(set(dtypes) == {torch.float32} for _, dtypes in seen), seen

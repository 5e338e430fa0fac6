"""Second derivatives and torch.func through the fused cores.

* ``gradgradcheck`` (float64) of every core and option path on the reference and native
  backends (Triton: tests/triton/test_higher_order.py): a fused backward run with
  ``create_graph=True`` differentiates the reference, so second derivatives are right.
* First-order backwards still run the fused kernel (no reference call), and both give the
  same gradient.
* A gradient penalty (the gradient of ||dL/ds||²) through the public losses matches the
  reference backend's.
* ``torch.func.grad``/``vmap``/``jacrev``/``hessian`` over the public losses: ``auto`` runs
  the reference under a transform; an explicit fused backend raises.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
import kdfast.ops.attention
import kdfast.ops.gram
import kdfast.ops.mmd
from kdfast import backends
from kdfast import functional as KF
from tests.helpers import assert_rel_close, randn

NATIVE = kdfast.available_backends()["native"]
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")


# name -> (core, student shapes, teacher shapes, core options). Awkward sizes: odd C,
# H·W not a power of two, C_s != C_t, B = 1, student and teacher maps of different sizes.
CASES = {
    "at-p2": ("attention_map", [(2, 3, 5, 3)], [], {"p": 2.0}),
    "at-p3-b1": ("attention_map", [(1, 5, 3, 5)], [], {"p": 3.0}),
    "sp": ("similarity", [(3, 3, 5, 3)], [(3, 4, 2, 3)], {}),
    "sp-flat": ("similarity", [(4, 7)], [(4, 5)], {}),
    "fsp": ("fsp", [(2, 3, 5, 3), (2, 4, 5, 3)], [(2, 3, 3, 3), (2, 4, 3, 3)], {}),
    "mmd-linear": ("channel_mmd", [(2, 3, 5, 3)], [(2, 4, 5, 3)], {"kernel": "linear"}),
    "mmd-linear-unbiased-b1": ("channel_mmd", [(1, 3, 5, 3)], [(1, 4, 5, 3)],
                               {"kernel": "linear", "unbiased": True}),
    "mmd-poly2": ("channel_mmd", [(2, 3, 5, 3)], [(2, 4, 5, 3)], {"kernel": "poly"}),
    # H·W = 4 < C_s + C_t = 7: the D × D feature-Gram path.
    "mmd-poly2-feature-grams": ("channel_mmd", [(2, 3, 2, 2)], [(2, 4, 2, 2)],
                                {"kernel": "poly", "coef": 0.5}),
    "mmd-poly3-unbiased": ("channel_mmd", [(2, 3, 5, 3)], [(2, 4, 5, 3)],
                           {"kernel": "poly", "degree": 3, "coef": 0.5, "unbiased": True}),
    "mmd-rbf-list": ("channel_mmd", [(2, 3, 5, 3)], [(2, 4, 5, 3)],
                     {"kernel": "rbf", "sigma2": (0.5, 2.0), "teacher_term": False}),
}
# sigma2="mean" is detached by definition, so finite differences (which move it) disagree
# with every gradient; it is covered by the gradient-penalty and torch.func tests instead.


def case_inputs(name: str, teacher_grad: bool, device: str = "cpu") -> list[torch.Tensor]:
    _, student, teacher, _ = CASES[name]
    shapes = [(shape, True) for shape in student] + [(shape, teacher_grad) for shape in teacher]
    return [randn(*shape, seed=i).to(device).requires_grad_(grad)
            for i, (shape, grad) in enumerate(shapes)]


def core_fn(name: str, backend: str, inputs):
    """The backend's core of case ``name`` as a function of the case's tensors only."""
    core, _, _, options = CASES[name]
    fn = backends.choose(core, backend, *inputs).fn
    if core == "attention_map":
        return lambda features: fn(features, options["p"])
    return lambda *tensors: fn(*tensors, **options)


def teacher_grad_options(name: str) -> list[bool]:
    return [False, True] if CASES[name][2] else [False]


PARAMS = [pytest.param(name, teacher_grad, id=f"{name}-{'t-grad' if teacher_grad else 't-fixed'}")
          for name in CASES for teacher_grad in teacher_grad_options(name)]
BACKENDS = ["reference", pytest.param("native", marks=needs_native)]


def check_gradgrad(name: str, teacher_grad: bool, backend: str, device: str = "cpu") -> None:
    inputs = case_inputs(name, teacher_grad, device)
    assert torch.autograd.gradgradcheck(core_fn(name, backend, inputs), inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,teacher_grad", PARAMS)
def test_gradgradcheck(name, teacher_grad, backend):
    check_gradgrad(name, teacher_grad, backend)


def count_calls(monkeypatch, module, attribute: str) -> list[int]:
    """Counts the calls of ``module.attribute`` (a reference a fused Function uses)."""
    reference, calls = getattr(module, attribute), []

    def counted(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)
    monkeypatch.setattr(module, attribute, counted)
    return calls


def check_first_order_runs_the_fused_kernel(name: str, teacher_grad: bool, backend: str,
                                            calls: list[int], device: str = "cpu") -> None:
    """A plain backward calls no reference (``calls`` counts them) and gives the gradient a
    create_graph backward gives through the reference."""
    inputs = case_inputs(name, teacher_grad, device)
    wanted = [x for x in inputs if x.requires_grad]
    out = core_fn(name, backend, inputs)(*inputs)
    grad_out = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype,
                              device=device).view_as(out)
    calls.clear()  # (the Triton poly-2 feature-Gram path runs the reference forward)
    fused = torch.autograd.grad(out, wanted, grad_out, retain_graph=True)
    assert not calls, "a first-order backward must not run the reference"
    differentiable = torch.autograd.grad(out, wanted, grad_out, create_graph=True)
    assert len(calls) == 1, "a create_graph backward differentiates the reference once"
    for got, want, x in zip(differentiable, fused, wanted, strict=True):
        assert got.requires_grad and got.dtype == x.dtype and got.shape == x.shape
        assert_rel_close(got, want, 1e-12, "create_graph gradient vs the fused one")


# Where each native Function finds the reference it differentiates, by core.
NATIVE_REFERENCES = {"attention_map": (kdfast.ops.attention, "attention_map"),
                     "similarity": (kdfast.ops.gram, "similarity_loss"),
                     "fsp": (kdfast.ops.gram, "fsp_pair_loss"),
                     "channel_mmd": (kdfast.ops.mmd, "channel_mmd")}


@needs_native
@pytest.mark.parametrize("name,teacher_grad", PARAMS)
def test_first_order_backward_runs_the_fused_kernel(name, teacher_grad, monkeypatch):
    calls = count_calls(monkeypatch, *NATIVE_REFERENCES[CASES[name][0]])
    check_first_order_runs_the_fused_kernel(name, teacher_grad, "native", calls)


# name -> (loss(student, teacher, backend), student shape, teacher shape)
LOSSES = {
    "at": (lambda s, t, b: KF.at_loss(s, t, backend=b), (2, 3, 6, 5), (2, 4, 3, 5)),
    "at-paper-p3": (lambda s, t, b: KF.at_loss(s, t, p=3.0, mode="paper", backend=b),
                    (1, 3, 5, 3), (1, 2, 5, 3)),
    "sp": (lambda s, t, b: KF.sp_loss(s, t, backend=b), (3, 3, 5, 3), (3, 4, 2, 3)),
    "fsp": (lambda s, t, b: KF.fsp_loss([(s, s.flip(1) * 2)], [(t, t.flip(1))], backend=b),
            (2, 3, 5, 3), (2, 3, 3, 3)),
    "nst-linear": (lambda s, t, b: KF.nst_loss(s, t, kernel="linear", backend=b),
                   (2, 3, 5, 3), (2, 4, 5, 3)),
    "nst-poly": (lambda s, t, b: KF.nst_loss(s, t, backend=b), (2, 3, 5, 3), (2, 4, 5, 3)),
    "nst-poly-feature-grams": (lambda s, t, b: KF.nst_loss(s, t, coef=0.5, backend=b),
                               (2, 5, 2, 3), (2, 4, 2, 3)),
    "nst-rbf-list": (lambda s, t, b: KF.nst_loss(s, t, kernel="rbf", sigma2=[0.5, 2.0],
                                                 unbiased=True, backend=b),
                     (2, 3, 5, 3), (2, 4, 5, 3)),
    "nst-rbf-mean": (lambda s, t, b: KF.nst_loss(s, t, kernel="rbf", sigma2="mean",
                                                 teacher_term=False, backend=b),
                     (2, 3, 5, 3), (2, 4, 5, 3)),
}
FUSED_LOSS_BACKEND = "native" if NATIVE else "reference"


def gradient_penalty_grads(name: str, backend: str, teacher_grad: bool):
    """d/d(s, t) of ||dL/ds||² (the teacher's gradient only when it requires grad)."""
    loss, s_shape, t_shape = LOSSES[name]
    student = randn(*s_shape, seed=1, requires_grad=True)
    teacher = randn(*t_shape, seed=2, requires_grad=teacher_grad)
    (grad,) = torch.autograd.grad(loss(student, teacher, backend), student, create_graph=True)
    penalty = grad.pow(2).sum()
    wanted = [student, teacher] if teacher_grad else [student]
    return [penalty, *torch.autograd.grad(penalty, wanted)]


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["t-fixed", "t-grad"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_penalty_matches_the_reference(name, teacher_grad):
    got = gradient_penalty_grads(name, FUSED_LOSS_BACKEND, teacher_grad)
    want = gradient_penalty_grads(name, "reference", teacher_grad)
    assert got[0].item() > 0
    for what, g, w in zip(["penalty", "student", "teacher"], got, want, strict=False):
        assert_rel_close(g, w, 1e-10, what)


@needs_native
@pytest.mark.parametrize("name", ["at", "sp", "nst-rbf-list"])
def test_create_graph_gradient_keeps_channels_last(name):
    loss, s_shape, t_shape = LOSSES[name]
    student = randn(*s_shape, seed=7).to(memory_format=torch.channels_last).requires_grad_()
    teacher = randn(*t_shape, seed=8)
    (grad,) = torch.autograd.grad(loss(student, teacher, "native"), student, create_graph=True)
    assert grad.is_contiguous(memory_format=torch.channels_last)


# --- torch.func ---------------------------------------------------------------------------

FUNC_LOSSES = {
    **LOSSES,
    "kd": (lambda s, t, b: KF.kd_loss(s, t, backend=b), (3, 7), (3, 7)),
    "rkd": (lambda s, t, b: KF.rkd_loss(s, t, backend=b), (4, 6), (4, 5)),
}


def func_inputs(name: str, batch: int | None = None):
    _, s_shape, t_shape = FUNC_LOSSES[name]
    lead = () if batch is None else (batch,)
    return randn(*lead, *s_shape, seed=3), randn(*lead, *t_shape, seed=4)


@pytest.mark.parametrize("name", sorted(FUNC_LOSSES))
def test_func_grad_matches_autograd(name):
    loss = FUNC_LOSSES[name][0]
    student, teacher = func_inputs(name)
    got = torch.func.grad(lambda s, t: loss(s, t, None), argnums=(0, 1))(student, teacher)
    leaves = [student.clone().requires_grad_(), teacher.clone().requires_grad_()]
    want = torch.autograd.grad(loss(*leaves, None), leaves, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert_rel_close(g, torch.zeros_like(g) if w is None else w, 1e-10, "gradient")


@pytest.mark.parametrize("name", sorted(FUNC_LOSSES))
def test_func_vmap_over_a_batch_of_losses(name):
    loss = FUNC_LOSSES[name][0]
    students, teachers = func_inputs(name, batch=3)
    got = torch.func.vmap(lambda s, t: loss(s, t, None))(students, teachers)
    want = torch.stack([loss(s, t, None) for s, t in zip(students, teachers, strict=True)])
    assert_rel_close(got, want, 1e-12, "vmapped losses")


@pytest.mark.parametrize("name", ["at", "sp", "fsp", "nst-rbf-mean", "kd", "rkd"])
def test_func_per_sample_jacrev(name):
    loss = FUNC_LOSSES[name][0]
    student, teacher = func_inputs(name)
    got = torch.func.jacrev(lambda s: loss(s, teacher, None))(student)
    want = torch.autograd.functional.jacobian(lambda s: loss(s, teacher, None), student)
    assert_rel_close(got, want, 1e-10, "jacobian")


def test_func_hessian_matches_double_backward_through_the_fused_core():
    # torch.func.hessian runs the reference (forward-over-reverse); autograd's hessian runs
    # the auto (native) forward and differentiates its create_graph backward.
    teacher = randn(1, 2, 3, 2, seed=5)
    def loss(s):
        return KF.nst_loss(s, teacher, kernel="rbf", sigma2=[0.7])
    student = randn(1, 3, 3, 2, seed=6)
    got = torch.func.hessian(loss)(student)
    want = torch.autograd.functional.hessian(loss, student)
    assert_rel_close(got, want, 1e-10, "hessian")


@needs_native
def test_explicit_fused_backend_under_a_transform_raises():
    student, teacher = func_inputs("at")
    with pytest.raises(ValueError, match="backend='native' cannot run attention_map: a torch"
                                         r".func transform"):
        torch.func.grad(lambda s: KF.at_loss(s, teacher, backend="native"))(student)


@needs_native
def test_environment_preference_under_a_transform_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "native")
    monkeypatch.setattr(backends, "_WARNED", set())
    student, teacher = func_inputs("sp")
    with pytest.warns(RuntimeWarning, match="torch.func transform"):
        got = torch.func.grad(lambda s: KF.sp_loss(s, teacher))(student)
    leaf = student.clone().requires_grad_()
    (want,) = torch.autograd.grad(KF.sp_loss(leaf, teacher, backend="reference"), leaf)
    assert_rel_close(got, want, 1e-12, "gradient")


def test_transform_check_degrades_without_torch_support(monkeypatch):
    assert not backends.functorch_transform_active()
    assert torch.func.grad(lambda x: x * float(backends.functorch_transform_active()))(
        torch.tensor(2.0)) == 1.0
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active")
    assert not backends.functorch_transform_active()

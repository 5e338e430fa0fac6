"""Every public loss under torch.compile(fullgraph=True): no graph break, same value and
gradients as eager (aot_eager: Dynamo + AOTAutograd with the fake implementations of the
native ops; one Inductor case runs the whole stack)."""

import pytest
import torch

import kdfast
from kdfast import backends
from kdfast import functional as KF
from tests.helpers import assert_rel_close


def make(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


LOSSES = {
    "at": (lambda s, t: KF.at_loss(s, t), (3, 4, 6, 6), (3, 5, 3, 3)),
    "nst-poly": (lambda s, t: KF.nst_loss(s, t), (2, 5, 3, 4), (2, 3, 3, 4)),
    "nst-rbf-mean": (lambda s, t: KF.nst_loss(s, t, kernel="rbf", sigma2="mean"),
                     (2, 5, 3, 4), (2, 3, 3, 4)),
    "nst-linear": (lambda s, t: KF.nst_loss(s, t, kernel="linear"), (2, 5, 3, 4), (2, 3, 3, 4)),
    "sp": (lambda s, t: KF.sp_loss(s, t), (4, 3, 2, 2), (4, 5, 3, 3)),
    "fsp": (lambda s, t: KF.fsp_loss([(s, s.flip(1))], [(t, t.flip(1))]), (2, 3, 4, 4),
            (2, 3, 2, 2)),
    "rkd": (lambda s, t: KF.rkd_loss(s, t), (5, 7), (5, 3)),
    "ab": (lambda s, t: KF.ab_loss(s, t), (2, 3, 4, 4), (2, 3, 4, 4)),
    "fitnet": (lambda s, t: KF.fitnet_loss(s, t), (2, 3, 4, 4), (2, 3, 4, 4)),
    "kd": (lambda s, t: KF.kd_loss(s, t), (4, 10), (4, 10)),
    "dml": (lambda s, t: KF.dml_loss(s, [t, t * 2]), (4, 10), (4, 10)),
}


def value_and_grad(fn, student, teacher):
    student = student.clone().requires_grad_(True)
    out = fn(student, teacher)
    (grad,) = torch.autograd.grad(out * 1.5, student)
    return out, grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_loss_matches_eager(name):
    fn, s_shape, t_shape = LOSSES[name]
    student, teacher = make(*s_shape, seed=0), make(*t_shape, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grad = value_and_grad(compiled, student, teacher)
    ref_out, ref_grad = value_and_grad(fn, student, teacher)
    assert_rel_close(out, ref_out, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_fsp_pair_of_one_tensor_compiles(backend):
    # [(s, s)] hands one tensor to two inputs of the core, which Dynamo cannot trace into an
    # autograd Function ("duplicate tensor input"); here the teacher is the student as well.
    if not kdfast.available_backends()[backend]:
        pytest.skip(f"{backend} not built")

    def fn(s, t, backend=backend):
        return (KF.fsp_loss([(s, s)], [(t, t)], backend=backend)
                + KF.fsp_loss([(s, s.flip(1))], [(s, s)], backend=backend))

    student, teacher = make(2, 3, 4, 4, seed=5), make(2, 3, 2, 2, seed=6)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grad = value_and_grad(compiled, student, teacher)
    ref_out, ref_grad = value_and_grad(lambda s, t: fn(s, t, "reference"), student, teacher)
    assert_rel_close(out, ref_out, 1e-12, "value")
    assert_rel_close(grad, ref_grad, 1e-12, "gradient")


@pytest.mark.skipif(not kdfast.available_backends()["native"], reason="native not built")
def test_auto_picks_native_inside_compile_and_inductor_matches():
    student, teacher = make(2, 6, 5, 5, seed=2).float(), make(2, 4, 5, 5, seed=3).float()
    chosen = []

    def loss(s, t):
        chosen.append(backends.choose("channel_mmd", None, s, t).backend)
        return KF.nst_loss(s, t, kernel="rbf")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    out, grad = value_and_grad(compiled, student, teacher)
    ref_out, ref_grad = value_and_grad(lambda s, t: KF.nst_loss(s, t, kernel="rbf",
                                                                backend="reference"),
                                       student, teacher)
    assert chosen[0] == "native"
    assert_rel_close(out, ref_out, 1e-5, "value")
    assert_rel_close(grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("order", [("triton", "reference"), ("reference", "triton")])
def test_auto_keeps_its_order_while_compiling(monkeypatch, order):
    # The Triton cores are torch.library operators too (kdfast/ops/<core>.py), so compiling
    # changes nothing in the choice: inside a traced function (where torch.compiler.
    # is_compiling() is True) ``auto`` walks the same order as in eager.
    monkeypatch.setitem(backends._REGISTRY, "probe", {})
    backends.register("probe", "reference", lambda x: x)
    backends.register("probe", "triton", lambda x: x)  # supports everything
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", order)
    x = make(1, 2, 3, 3, seed=4)
    assert backends.choose("probe", "auto", x).backend == order[0]
    chosen = []

    def traced(t):
        chosen.append((torch.compiler.is_compiling(), backends.choose("probe", "auto", t).backend))
        return t * 2

    torch._dynamo.reset()
    torch.compile(traced, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    assert chosen == [(True, order[0])]

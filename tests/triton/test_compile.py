"""The Triton cores inside torch.compile(fullgraph=True): their launchers are torch.library
operators (kdfast/ops/<core>.py), so the graph does not break and values and gradients match
eager; torch.library.opcheck checks each operator's schema and fake implementation."""

import pytest
import torch

from kdfast.functional import at_loss, fsp_loss, nst_loss, sp_loss
from kdfast.ops import attention, gram
from kdfast.ops import mmd as mmd_ops
from kdfast.ops import softmax_kl as softmax_kl_ops
from tests.helpers import assert_rel_close

pytestmark = pytest.mark.triton_interpret

LOSSES = {
    "at": lambda s, t: at_loss(s, t, backend="triton", p=3.0),
    "sp": lambda s, t: sp_loss(s, t, backend="triton"),
    "fsp": lambda s, t: fsp_loss([(s, s.flip(1))], [(t, t.flip(1))], backend="triton"),
    "nst-linear": lambda s, t: nst_loss(s, t, kernel="linear", unbiased=True, backend="triton"),
    "nst-poly": lambda s, t: nst_loss(s, t, backend="triton"),
    "nst-rbf-mean": lambda s, t: nst_loss(s, t, kernel="rbf", sigma2="mean", backend="triton"),
    "nst-rbf-list": lambda s, t: nst_loss(s, t, kernel="rbf", sigma2=[0.5, 2.0], unbiased=True,
                                          teacher_term=False, backend="triton"),
}


def values_and_grads(fn, student, teacher):
    leaves = [student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out * 1.5, leaves)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_triton_loss_matches_eager(name, precise):
    student, teacher = precise.randn(2, 3, 5, 4), precise.randn(2, 3, 5, 4)
    torch._dynamo.reset()
    compiled = torch.compile(LOSSES[name], fullgraph=True, backend="aot_eager")
    out, grads = values_and_grads(compiled, student, teacher)
    ref_out, ref_grads = values_and_grads(LOSSES[name], student, teacher)
    assert_rel_close(out, ref_out, precise.tol, "value")
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_rel_close(grad, ref_grad, precise.tol, "gradient")


def test_inductor_runs_the_triton_mmd_operator(precise):
    student, teacher = precise.randn(2, 4, 3, 3), precise.randn(2, 5, 3, 3)
    fn = LOSSES["nst-rbf-mean"]
    torch._dynamo.reset()
    out, grads = values_and_grads(torch.compile(fn, fullgraph=True), student, teacher)
    ref_out, ref_grads = values_and_grads(
        lambda s, t: nst_loss(s, t, kernel="rbf", sigma2="mean", backend="reference"),
        student, teacher)
    assert_rel_close(out, ref_out, precise.tol, "value")
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_rel_close(grad, ref_grad, precise.tol, "gradient")


def _forward_outputs(op, args):
    return [t for t in op(*args) if isinstance(t, torch.Tensor)]


def op_cases(precise):
    """(operator, arguments) for every kdfast_triton operator, backward ones fed by a forward."""
    x, y = precise.randn(2, 3, 4, 5), precise.randn(2, 4, 4, 5)
    x_last = x.to(memory_format=torch.channels_last)
    grad = precise.randn(2)
    q, norm = attention._triton_attention_map(x_last, 3.0)
    loss, grams = gram._triton_similarity(x, y)
    fsp_args = (x, x.flip(1), y[:, :3], y[:, 1:])
    _, diff = gram._triton_fsp(*fsp_args)
    linear = mmd_ops._triton_linear(x, y, True, True)
    mmd_args = (x, y, "rbf", 2, 0.0, [0.5, 2.0], False, True, True, True, True)
    mmd = mmd_ops._triton_gram(*mmd_args)
    logits = (precise.randn(3, 7), precise.randn(3, 7))
    _, row_stats = softmax_kl_ops.triton_softmax_kl_with_stats_op(*logits, 2.0, "jsd", 0.3)
    return [
        (attention._triton_attention_map, (x_last, 3.0)),
        (attention._triton_attention_map_backward,
         (precise.randn(2, 20), x_last, q, norm, 3.0)),
        (gram._triton_similarity, (x, y)),
        (gram._triton_similarity_backward, (grad, x, y, grams, True, False)),
        (gram._triton_fsp, fsp_args),
        (gram._triton_fsp_backward, (grad, *fsp_args, diff, [True, False, True, True])),
        (mmd_ops._triton_linear, (x, y, True, False)),
        (mmd_ops._triton_linear_backward, (grad, x, y, *linear[1:], True, True, True, True)),
        (mmd_ops._triton_linear_backward, (grad, x, y, *linear[1:], False, True, False, True)),
        (mmd_ops._triton_gram, mmd_args),
        (mmd_ops._triton_gram, (x, y, "poly", 2, 1.0, [], False, False, False, False, True)),
        (mmd_ops._triton_gram, (x, y, "rbf", 2, 0.0, [], True, False, True, True, False)),
        (mmd_ops._triton_gram_backward, (grad, x, y, *mmd[1:], "rbf", 2, 0.0, True, True, True,
                                         True)),
        (softmax_kl_ops.triton_softmax_kl_with_stats_op, (*logits, 2.0, "jsd", 0.3)),
        (softmax_kl_ops.triton_softmax_kl_backward_op,
         (precise.randn(3), *logits, row_stats, 2.0, "jsd", 0.3, True, True)),
        (softmax_kl_ops.triton_softmax_kl_backward_op,
         (precise.randn(3), *logits, row_stats, 2.0, "jsd", 0.3, False, True)),
    ]


def test_every_operator_passes_opcheck(precise):
    cases = op_cases(precise)
    assert {op._qualname for op, _ in cases} == {
        f"kdfast_triton::{name}" for name in (
            "attention_map", "attention_map_backward", "similarity", "similarity_backward",
            "fsp", "fsp_backward", "channel_mmd_linear", "channel_mmd_linear_backward",
            "channel_mmd_gram", "channel_mmd_gram_backward", "softmax_kl_with_stats",
            "softmax_kl_backward")}
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))

"""Value-and-gradient parity of a Triton core against its reference (float64 upcast)."""

from __future__ import annotations

import torch

from tests.helpers import assert_rel_close


def check_parity(fn, ref, inputs, tol: float, grad_tol: float | None = None,
                 grad_inputs=None, **options):
    """Runs ``fn`` and ``ref`` on fresh leaves of ``inputs`` with a random grad_output and
    compares the values and the gradients of the inputs in ``grad_inputs`` (default: all).

    The reference runs on float64 copies, so low-precision inputs are judged against the
    exact result. Returns the Triton output.
    """
    grad_tol = tol if grad_tol is None else grad_tol
    wanted = range(len(inputs)) if grad_inputs is None else grad_inputs
    leaves = [x.detach().clone().requires_grad_(i in wanted) for i, x in enumerate(inputs)]
    ref_leaves = [x.detach().double().requires_grad_(i in wanted) for i, x in enumerate(inputs)]
    out = fn(*leaves, **options)
    expected = ref(*ref_leaves, **options)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(expected, [ref_leaves[i] for i in wanted], grad_out)
    assert_rel_close(out, expected, tol, "value")
    for i, grad, ref_grad in zip(wanted, grads, ref_grads, strict=True):
        assert grad.dtype == inputs[i].dtype
        if leaves[i].dim() == 4 and leaves[i].is_contiguous(memory_format=torch.channels_last):
            assert grad.stride() == leaves[i].stride(), "gradient must keep channels_last"
        assert_rel_close(grad, ref_grad, grad_tol, f"gradient of input {i}")
    return out

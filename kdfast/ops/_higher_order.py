"""Second and higher derivatives through the fused cores.

A fused backward (a native or Triton operator) returns a gradient with no graph behind it, so
differentiating it again (``create_graph=True``: a gradient penalty, ``gradgradcheck``) would
see a constant. Autograd runs a backward with grad mode on exactly when it must build such a
graph; then every fused Function differentiates its core's reference instead: it recomputes
the reference from the saved inputs (saved inputs keep their own graph) and returns

    torch.autograd.grad(reference(*inputs), needed inputs, grad_output, create_graph=True),

the same first derivative (to rounding) with a graph for every further one, in the inputs'
and grad_output's terms. First-order training (grad mode off in the backward) keeps the fused
kernels. The recompute costs one reference forward and backward per differentiable backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kdfast._precision import autocast_off


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` records a graph (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def creates_graph() -> bool:
    """Inside a Function's backward: whether its gradients must be differentiable
    (``create_graph=True``; autograd turns grad mode on for such a backward only)."""
    return torch.is_grad_enabled()


def _in_layout_of(grad: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``grad`` in channels_last when ``x`` is (as the fused backwards return it), by a
    differentiable copy where needed; other layouts as autograd gives them."""
    channels_last = torch.channels_last
    if (grad is None or x.dim() != 4 or x.is_contiguous()
            or not x.is_contiguous(memory_format=channels_last)):
        return grad
    return grad.contiguous(memory_format=channels_last)


def reference_grads(reference: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                    needs: Sequence[bool], grad_output: torch.Tensor
                    ) -> tuple[torch.Tensor | None, ...]:
    """Differentiable gradients of ``reference(*inputs)`` weighted by ``grad_output``: one per
    input, None where ``needs`` (a Function's ``ctx.needs_input_grad``) is False or the
    reference does not depend on the input (autograd reads None as zeros)."""
    needs = tuple(needs)[:len(inputs)]  # ctx.needs_input_grad also covers non-tensor options
    if not any(needs):
        return tuple(None for _ in inputs)
    with torch.enable_grad(), autocast_off(inputs[0]):
        # Fresh aliases: the partial derivative in each input, not the total one through
        # another input computed from it (e.g. FSP's pair (s, f(s))).
        aliases = [x.view_as(x) for x in inputs]
        out = reference(*aliases)
        wanted = [alias for alias, need in zip(aliases, needs, strict=True) if need]
        found = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=True,
                                         allow_unused=True))
        return tuple(_in_layout_of(next(found), x) if need else None
                     for x, need in zip(inputs, needs, strict=True))

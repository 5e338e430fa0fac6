"""Gradient-based attention transfer: ``gradient_at_loss`` and ``GradientATLoss``."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair
from kdfast.ops.gradient_attention import CORE
from kdfast.reference.gradient_attention import input_gradient

INPUT_NDIMS = (2, 3, 4, 5)


def check_gradient_at_options(reduction: str = "mean") -> None:
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def _input_gradient_of(name: str, logits: torch.Tensor, inputs: torch.Tensor,
                       targets: torch.Tensor, create_graph: bool) -> torch.Tensor:
    grad = input_gradient(logits, inputs, targets, create_graph) if logits.requires_grad \
        else None
    if grad is None:
        raise ValueError(f"{name} do not depend on inputs: compute them from inputs after "
                         "inputs.requires_grad_(), outside torch.no_grad() (a frozen "
                         "network is fine, its graph to the inputs is what is needed)")
    return grad


def gradient_at_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     inputs: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                     backend: str | None = None) -> torch.Tensor:
    r"""Gradient-based attention transfer (Zagoruyko & Komodakis, 2017, section 3.2).

    .. math::
        J = \frac{\partial}{\partial x}\sum_b \mathrm{CE}(z_b, y_b),\qquad
        \ell_b = \lVert J_{s,b} - J_{t,b}\rVert_2

    over the flattened input of each sample, then ``reduction`` over the batch. The CE is
    **summed** over the batch, so each sample's J is the input gradient of its own loss,
    independent of B. :math:`J_s` is built with ``create_graph=True`` (double backprop: the
    loss trains the student through its input gradient); :math:`J_t` is a constant. The
    paper's objective is CE + (beta/2) * this loss; beta is the caller's weight.

    ``inputs`` must require grad and both logits must have been computed from it (the
    teacher outside ``torch.no_grad()``; its parameters may be frozen). Backward also
    accumulates a gradient into ``inputs.grad``.

    Args:
        student_logits, teacher_logits: (B, num_classes), same shape, computed from ``inputs``.
        inputs: (B, ...) floating-point inputs with ``requires_grad=True``.
        targets: (B,) integer class indices.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` / ``"auto"`` / ``"reference"`` (no fused core).

    Example:
        >>> x = images.requires_grad_()
        >>> loss = F.cross_entropy(student(x), y) + 0.5 * kdfast.functional.gradient_at_loss(
        ...     student(x), teacher(x), x, y)  # doctest: +SKIP
    """
    check_gradient_at_options(reduction)
    check_logit_pair(student_logits, teacher_logits)
    _checks.check_tensor("inputs", inputs, INPUT_NDIMS, "(B, ...)")
    _checks.check_same_batch(student_logits, inputs, ("student_logits", "inputs"))
    if not inputs.requires_grad:
        raise ValueError("inputs must require grad: call inputs.requires_grad_() before the "
                         "student's and the teacher's forward passes")
    batch, num_classes = student_logits.shape
    targets = _checks.check_labels("targets", targets, batch, num_classes,
                                   student_logits.device)
    # The dtype rule over all three inputs: the logits' cross-entropy and the distance of the
    # input gradients (which autograd returns in the inputs' dtype) run in the promoted dtype.
    dtype = _checks.promoted_dtype(student_logits, teacher_logits, inputs)
    student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)
    student_grad = _input_gradient_of("student_logits", student_logits, inputs, targets, True)
    teacher_grad = _input_gradient_of("teacher_logits", teacher_logits, inputs, targets,
                                      False).detach()
    student_grad, teacher_grad = (g.to(dtype) for g in (student_grad, teacher_grad))
    distance = backends.choose(CORE, backend, student_grad, teacher_grad).fn
    return _checks.reduce(distance(student_grad, teacher_grad), reduction)


class GradientATLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.gradient_at_loss`;
    ``forward(student_logits, teacher_logits, inputs, targets)``. Default ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.GradientATLoss()
        >>> x.requires_grad_()
        >>> loss = criterion(student(x), teacher(x), x, y)  # doctest: +SKIP
    """

    function = staticmethod(gradient_at_loss)
    validate = staticmethod(check_gradient_at_options)

    def __init__(self, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(reduction=reduction, backend=backend)

"""Gradient-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, section 3.2).

J = dCE/dx, the gradient of the classification loss w.r.t. the network's input, is the
network's "gradient attention" map. The student matches the teacher's:
loss_b = ||J_s,b - J_t,b||_2 over the flattened input of sample b.

The cross-entropy is summed over the batch (``reduction="sum"``), so sample b's slice of J is
the gradient of sample b's own loss: it does not shrink with the batch size (with a batch-mean
CE every J would be divided by B).
"""

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                   create_graph: bool) -> torch.Tensor | None:
    """J = d sum_b CE(logits_b, targets_b) / d inputs (shape of inputs), or None if the logits
    do not depend on ``inputs``. ``create_graph=True`` keeps the graph for double backprop."""
    ce = F.cross_entropy(upcast_low_precision(logits), targets, reduction="sum")
    # retain_graph: the student's and the teacher's graphs may share nodes (the same network,
    # a shared preprocessing) that a later backward through J_s still needs.
    (grad,) = torch.autograd.grad(ce, inputs, create_graph=create_graph, retain_graph=True,
                                  allow_unused=True)
    return grad


def gradient_distance(student_grad: torch.Tensor, teacher_grad: torch.Tensor) -> torch.Tensor:
    """Per-sample ||J_s - J_t||_2 over all non-batch dimensions, shape (B,)."""
    diff = upcast_low_precision(student_grad) - upcast_low_precision(teacher_grad)
    return torch.linalg.vector_norm(diff.flatten(1), dim=1)


def gradient_at_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample ||J_s - J_t||_2, J_s with a graph (double backprop), J_t without: (B,)."""
    student_grad = input_gradient(student_logits, inputs, targets, create_graph=True)
    teacher_grad = input_gradient(teacher_logits, inputs, targets, create_graph=False)
    return gradient_distance(student_grad, teacher_grad.detach())

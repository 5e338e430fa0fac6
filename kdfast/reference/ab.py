"""Activation boundaries (Heo et al., AAAI 2019): transfer of the neurons' on/off pattern.

On pre-ReLU features s (student, after its connector) and t (teacher), margin m > 0:
    l = (s + m)^2 * 1[s > -m and t <= 0] + (s - m)^2 * 1[s <= m and t > 0]
summed per sample over C*H*W (the alternative L2 loss of the paper, eq. 6).
"""

import torch

from kdfast.reference.numerics import upcast_low_precision


def ab_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Per-sample activation-boundary loss of two equally shaped (B, ...) tensors, shape (B,).

    The teacher only selects the branch (its sign), so it gets no gradient. A teacher value
    without a sign to transfer (NaN, ±inf) makes its sample's loss NaN rather than silently
    choosing a branch: t − t is 0 for every finite t and NaN otherwise.
    """
    student = upcast_low_precision(student)
    teacher_on = teacher > 0
    wrongly_on = (student > -margin) & ~teacher_on
    wrongly_off = (student <= margin) & teacher_on
    loss = ((student + margin).pow(2) * wrongly_on
            + (student - margin).pow(2) * wrongly_off)
    teacher = teacher.detach()
    return (loss + (teacher - teacher).to(loss.dtype)).flatten(1).sum(dim=1)

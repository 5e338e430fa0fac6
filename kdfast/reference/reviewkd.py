"""The hierarchical context loss (HCL) of ReviewKD (Chen et al., "Distilling Knowledge via
Knowledge Review", CVPR 2021; the ``hcl`` of dvlab-research/ReviewKD).

Per stage, the mean squared error of the two maps plus that of their adaptive average pools
to l x l for each pyramid level l (4, 2, 1) smaller than the map's height. The full map has
weight 1, each pooled level used half the weight of the one before (1/2, 1/4, 1/8 when all
three are used; a skipped level does not halve it), and the sum is divided by the total
weight. The stages' values are added. Per sample: the mean over (C, H, W) of each sample, whose
batch mean is the authors' global ``F.mse_loss``.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision

PYRAMID_LEVELS = (4, 2, 1)


def per_sample_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).flatten(1).mean(dim=1)


def stage_context_loss(student: torch.Tensor, teacher: torch.Tensor,
                       levels: Sequence[int] = PYRAMID_LEVELS) -> torch.Tensor:
    """HCL of one stage, (B,), for (B, C, H, W) maps of one shape."""
    student, teacher = upcast_low_precision(student), upcast_low_precision(teacher)
    height = student.shape[2]
    total = per_sample_mse(student, teacher)
    weight = total_weight = 1.0
    for level in levels:
        if level >= height:
            continue
        weight /= 2.0
        total = total + weight * per_sample_mse(F.adaptive_avg_pool2d(student, level),
                                                F.adaptive_avg_pool2d(teacher, level))
        total_weight += weight
    return total / total_weight


def hierarchical_context_loss(student_feats: Sequence[torch.Tensor],
                              teacher_feats: Sequence[torch.Tensor],
                              levels: Sequence[int] = PYRAMID_LEVELS) -> torch.Tensor:
    """Sum over stages of :func:`stage_context_loss`, (B,)."""
    return sum(stage_context_loss(s, t, levels)
               for s, t in zip(student_feats, teacher_feats, strict=True))

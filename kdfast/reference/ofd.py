"""Overhaul of feature distillation, OFD (Heo et al., "A Comprehensive Overhaul of Feature
Distillation", ICCV 2019; the formulas of clovaai/overhaul-distillation).

The teacher's pre-ReLU response of channel c is modelled as N(m_c, s_c²) with m_c, s_c the
shift (bias) and |scale| (weight) of the BatchNorm before the ReLU. The margin is the
expectation of its negative part, E[x | x < 0] = m - s·φ(m/s) / Φ(-m/s) (φ, Φ the standard
normal density and CDF); where Φ(-m/s) <= 0.001 (almost never negative) it is -3s instead.

The partial L2 compares the connector's output s with the teacher t raised to the margin,
t' = max(t, margin): (s - t')² counted where s > t' or t' > 0 (a student below a negative
teacher response is not penalised: the ReLU would zero both), summed per sample.
"""

import math

import torch

from kdfast.reference.numerics import upcast_low_precision

# Below this probability of a negative response the margin falls back to -3 s.
NEGATIVE_PROBABILITY_FLOOR = 1e-3


def margin_from_batchnorm(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin (C,) from a BatchNorm's weight (scale) and bias (shift), detached."""
    scale = upcast_low_precision(weight.detach()).abs()
    shift = upcast_low_precision(bias.detach())
    ratio = shift / scale
    negative_probability = torch.special.ndtr(-ratio)
    density = torch.exp(-ratio.pow(2) / 2) / math.sqrt(2 * math.pi)
    truncated_mean = shift - scale * density / negative_probability
    return torch.where(negative_probability > NEGATIVE_PROBABILITY_FLOOR, truncated_mean,
                       -3 * scale)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor
               ) -> torch.Tensor:
    """Per-sample partial L2 (B,) of (B, C, H, W) maps with a (C,) margin; teacher detached."""
    student = upcast_low_precision(student)
    target = torch.maximum(upcast_low_precision(teacher.detach()),
                           upcast_low_precision(margin).view(1, -1, 1, 1))
    counted = (student > target) | (target > 0)
    squared = (student - target).pow(2) * counted
    return squared.flatten(1).sum(dim=1)

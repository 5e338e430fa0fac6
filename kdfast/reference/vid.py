"""Variational information distillation, VID (Ahn et al., CVPR 2019), as RepDistiller's
``VIDLoss``.

The student's regressor predicts the mean mu of a Gaussian over the teacher's features t, with
one trainable variance per channel, sigma^2_c = softplus(alpha_c) + eps; the loss is the
negative log-likelihood without its constant:
loss = mean over b, c, h, w of 0.5 ((mu - t)^2 / sigma^2_c + log sigma^2_c).
"""

import math

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision

VID_EPS = 1e-5  # RepDistiller's floor of the variance
INIT_VARIANCE = 5.0  # RepDistiller's init_pred_var


def variance_from_scale(log_scale: torch.Tensor, eps: float = VID_EPS) -> torch.Tensor:
    """sigma^2 = softplus(alpha) + eps (RepDistiller's log(1 + exp(alpha)) + eps, stable)."""
    return F.softplus(log_scale) + eps


def scale_for_variance(variance: float, eps: float = VID_EPS) -> float:
    """alpha with softplus(alpha) + eps = variance: log(exp(variance - eps) - 1)."""
    return math.log(math.expm1(variance - eps))


def vid_loss(predicted_mean: torch.Tensor, teacher: torch.Tensor, variance: torch.Tensor
             ) -> torch.Tensor:
    """Per-sample VID loss, (B,): the mean over (C, ...) of
    0.5 ((mu - t)^2 / sigma^2_c + log sigma^2_c), ``variance`` of shape (C,)."""
    mu, t = upcast_low_precision(predicted_mean), upcast_low_precision(teacher)
    var = upcast_low_precision(variance).view(1, -1, *([1] * (mu.dim() - 2)))
    neg_log_prob = 0.5 * ((mu - t).pow(2) / var + torch.log(var))
    return neg_log_prob.flatten(1).mean(dim=1)

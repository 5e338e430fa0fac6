"""Logit distillation: Hinton KD (Hinton, Vinyals & Dean, 2015) and DML (Zhang et al., 2018).

Per-sample losses over (B, num_classes) logits. Probabilities come from ``log_softmax``
(never ``log(softmax)``), so logits of any magnitude give finite values.

Masked logits (padded classes, a vocabulary mask): a class whose teacher logit is −inf has
p_t = 0 and contributes 0 to the KL (the limit of p log p, never the 0·log 0 = NaN of the
plain product), with a gradient of exactly 0; a student −inf where the teacher has mass gives
+inf, as the KL is. NaN and +inf logits give NaN.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.reference._numerics import upcast_low_precision


def kl_terms(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """p_t (log p_t − log p_s) entry-wise, 0 where p_t = 0 (log p_t = −inf exactly).

    Double ``where``: the masked entries are replaced by 0 *before* the product too, so the
    unused branch computes nothing infinite and passes no NaN into the gradient. A NaN log p_t
    is not −inf, so it stays in (and the loss is NaN).
    """
    has_mass = log_p_t != float("-inf")
    safe_t = torch.where(has_mass, log_p_t, 0.0)
    safe_s = torch.where(has_mass, log_p_s, 0.0)
    return torch.where(has_mass, safe_t.exp() * (safe_t - safe_s), 0.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per sample, summed over classes: shape (B,).

    The T^2 factor keeps the gradient's scale independent of T:
    d/ds of the batch mean is (T/B)(p_s - p_t) with p = softmax(logits/T).
    """
    log_p_s = F.log_softmax(upcast_low_precision(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(upcast_low_precision(teacher_logits) / temperature, dim=1)
    return temperature**2 * kl_terms(log_p_t, log_p_s).sum(dim=1)


def dml_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over peers of T^2 * KL(p_peer || p_self) per sample, peers detached: shape (B,)."""
    losses = [kd_loss(logits, peer.detach(), temperature) for peer in peer_logits]
    return torch.stack(losses).mean(dim=0)

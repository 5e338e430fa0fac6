"""Logit distillation: Hinton KD (Hinton, Vinyals & Dean, 2015) and DML (Zhang et al., 2018).

Per-sample losses over (B, num_classes) logits. Probabilities come from ``log_softmax``
(never ``log(softmax)``), so logits of any magnitude give finite values.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.reference._numerics import upcast_low_precision


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per sample, summed over classes: shape (B,).

    The T^2 factor keeps the gradient's scale independent of T:
    d/ds of the batch mean is (T/B)(p_s - p_t) with p = softmax(logits/T).
    """
    log_p_s = F.log_softmax(upcast_low_precision(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(upcast_low_precision(teacher_logits) / temperature, dim=1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def dml_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over peers of T^2 * KL(p_peer || p_self) per sample, peers detached: shape (B,)."""
    losses = [kd_loss(logits, peer.detach(), temperature) for peer in peer_logits]
    return torch.stack(losses).mean(dim=0)

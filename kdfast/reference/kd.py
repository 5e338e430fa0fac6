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

from kdfast.reference.softmax_kl import kl_terms, softmax_kl

__all__ = ["dml_loss", "kd_loss", "kl_terms"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per sample, summed over classes: shape (B,).

    The T^2 factor keeps the gradient's scale independent of T:
    d/ds of the batch mean is (T/B)(p_s - p_t) with p = softmax(logits/T). The forward
    divergence of :func:`kdfast.reference.softmax_kl.softmax_kl`.
    """
    return softmax_kl(student_logits, teacher_logits, temperature, "forward")


def dml_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over peers of T^2 * KL(p_peer || p_self) per sample, peers detached: shape (B,)."""
    losses = [kd_loss(logits, peer.detach(), temperature) for peer in peer_logits]
    return torch.stack(losses).mean(dim=0)

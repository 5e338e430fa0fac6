"""Channel-wise distillation, CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021; mmrazor's ``ChannelWiseDivergence``).

Each channel c of a (B, C, H, W) map is turned into a distribution over its H·W positions,
``p = softmax(x[b, c].flatten() / τ)``, and the student's is pulled to the teacher's by
KL(p_t ‖ p_s), times τ². Per sample the channels are averaged:

    ℓ_b = loss_weight · τ² / C · Σ_c KL(p_t^{b,c} ‖ p_s^{b,c}),

so the batch mean of ℓ_b is mmrazor's τ² · Σ_{b,c} KL / (B·C). It is the forward divergence
of the row-wise softmax-KL (:func:`kdfast.reference.softmax_kl.softmax_kl`) on the B·C rows
of length H·W. Masked positions (−inf in both maps) contribute 0, as there.
"""

from __future__ import annotations

import torch

from kdfast.reference.softmax_kl import softmax_kl


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B·C, H·W): one row per (sample, channel); a view when contiguous."""
    return x.reshape(x.shape[0] * x.shape[1], -1)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             loss_weight: float = 1.0) -> torch.Tensor:
    """loss_weight · τ² · mean over channels of KL(p_t ‖ p_s) over positions: shape (B,)."""
    per_channel = softmax_kl(channel_rows(student), channel_rows(teacher), temperature)
    return loss_weight * per_channel.view(student.shape[0], student.shape[1]).mean(dim=1)

"""The eager reference of the ``"fused_linear_kd"`` core: logit distillation for language
models with the student's lm_head in the loss.

For hidden states h (N, H) and the lm_head weight W (V, H) (bias b), the student logits are
``s = h Wᵀ + b``; the teacher's are given (``teacher_logits`` (N, V)) or computed the same way
from its hidden states and lm_head (``t = h_t W_tᵀ + b_t``), and are never differentiated (a
frozen teacher). Per kept token (``labels != ignore_index`` when labels are given, every token
otherwise)

    ℓ_n = soft_weight · T² · divergence(p_t, p_s) + hard_weight · CE(s_n, labels_n),

the divergence being the ``"softmax_kl"`` core's (:mod:`kdfast.reference.softmax_kl`: forward
KL, reverse KL or the generalised JSD(β)) and the cross-entropy on the untempered logits
(only when ``hard_weight > 0``). ``reduction="mean"`` divides the sum over kept tokens by
``num_items`` when given (the global count of kept tokens, so gradient accumulation and data
parallel ranks normalise like one big batch) else by the local count of kept tokens;
``"sum"`` sums them; ``"none"`` returns ℓ per token (0 at ignored ones). With every token
ignored the loss is 0 with zero gradients, not NaN.

This materialises the (N, V) logits: it is the plain formula that the chunked native path
(:mod:`kdfast.ops.fused_linear_kd`) is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import softmax_kl


def kept_tokens(labels: torch.Tensor | None, num_tokens: int, ignore_index: int,
                device: torch.device) -> torch.Tensor:
    """(N,) bool: the tokens that count (labels != ignore_index; all without labels)."""
    if labels is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return labels.reshape(-1) != ignore_index


def mean_denominator(kept: torch.Tensor, num_items: int | None) -> torch.Tensor | int:
    """What ``reduction="mean"`` divides by: ``num_items``, else the kept count (at least 1,
    so that an all-ignored batch gives 0, not 0/0)."""
    if num_items is not None:
        return num_items
    return kept.sum().clamp_min(1)


def fused_linear_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    teacher_hidden: torch.Tensor | None = None,
                    teacher_weight: torch.Tensor | None = None, *,
                    teacher_logits: torch.Tensor | None = None,
                    student_bias: torch.Tensor | None = None,
                    teacher_bias: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, divergence: str = "forward",
                    beta: float = 0.5, temperature: float = 1.0, soft_weight: float = 1.0,
                    hard_weight: float = 0.0, ignore_index: int = -100,
                    num_items: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """The loss above, eagerly: a scalar, or per token (the hidden states' leading shape)
    for ``reduction="none"``; in the accumulation dtype (fp32 for fp16/bf16 inputs)."""
    token_shape = student_hidden.shape[:-1]
    hidden = upcast_low_precision(student_hidden.reshape(-1, student_hidden.shape[-1]))
    bias = None if student_bias is None else upcast_low_precision(student_bias)
    student = F.linear(hidden, upcast_low_precision(student_weight), bias)
    if teacher_logits is not None:
        teacher = upcast_low_precision(teacher_logits.reshape(student.shape))
    else:
        t_bias = None if teacher_bias is None else upcast_low_precision(teacher_bias)
        t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        teacher = F.linear(upcast_low_precision(t_hidden),
                           upcast_low_precision(teacher_weight), t_bias)
    teacher = teacher.detach()
    kept = kept_tokens(labels, student.shape[0], ignore_index, student.device)
    per_token = soft_weight * softmax_kl(student, teacher, temperature, divergence, beta)
    if hard_weight > 0:
        targets = torch.where(kept, labels.reshape(-1), 0)
        per_token = per_token + hard_weight * F.cross_entropy(student, targets,
                                                              reduction="none")
    per_token = torch.where(kept, per_token, 0.0)
    if reduction == "none":
        return per_token.reshape(token_shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / mean_denominator(kept, num_items)

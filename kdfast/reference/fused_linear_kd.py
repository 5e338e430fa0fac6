"""The eager reference of the ``"fused_linear_kd"`` core: logit distillation for language
models with the student's lm_head in the loss (docs/llm_distillation.md has the math).

Student logits. For hidden states h (N, H) and the lm_head weight W (V_s, H) (bias b),
``s = c · tanh(σ (h Wᵀ + b) / c)`` with ``σ = logit_scale`` and ``c = softcap`` (Gemma's
capping; without a cap ``s = σ (h Wᵀ + b)``).

Teacher, one of three forms, never differentiated (a frozen teacher):

* hidden states and lm_head: ``t = c_t · tanh(σ_t (h_t W_tᵀ + b_t) / c_t)`` (V_t, its own
  ``teacher_logit_scale`` σ_t and ``teacher_softcap`` c_t);
* ``teacher_logits`` (N, V_t), used as given (already scaled and capped);
* ``teacher_topk = (values, indices)`` (N, k): the teacher's k largest entries of each row
  and their vocabulary ids (distinct per row), see "Top-k teachers" below.

Vocabularies of different sizes (full teachers): the shorter of s and t is padded with −inf
columns to V = max(V_s, V_t), i.e. the classes one side lacks have probability 0 there (never
logit 0, which would give them mass).

Per kept token (``labels != ignore_index`` when labels are given, every token otherwise)

    ℓ_n = soft_weight · T² · D(p_t, p_s) + hard_weight · CE(s_n, labels_n),
    p = softmax(z / T),

the T² factor (Hinton et al.'s: it keeps the soft gradients' size independent of T) dropped
with ``scale_by_temperature_squared=False`` (what Liger-Kernel's and TRL's LLM losses do), and
D one of :data:`DIVERGENCES`:

* ``"forward"`` KL(p_t ‖ p_s), ``"reverse"`` KL(p_s ‖ p_t) and ``"jsd"`` (generalised JSD(β))
  as the ``"softmax_kl"`` core defines them (:mod:`kdfast.reference.softmax_kl`);
* ``"skew_forward"`` SKL_α = KL(p_t ‖ α p_t + (1 − α) p_s) and ``"skew_reverse"``
  SRKL_α = KL(p_s ‖ α p_s + (1 − α) p_t) (DistiLLM, Ko et al., ICML 2024), α ∈ [0, 1);
  α = 0 is the plain forward / reverse KL;
* ``"tv"`` the total variation ½ Σ_v |p_t,v − p_s,v|.

The cross-entropy is on the untempered student logits s (only when ``hard_weight > 0``).

Top-k teachers. ``values`` are the teacher's logits at ``indices``; for ``topk_tail=
"bucket"`` they must be its log-probabilities (``log_softmax`` of its full logits at
temperature 1, what inference servers return), since the mass outside the k ids is read from
them. Two treatments of the tail:

* ``"renormalize"``: both distributions restricted to the k ids and renormalised there,
  D(softmax(values / T), softmax(s_K / T)) with s_K the student's logits gathered at the k
  ids. Exact for every T (the tempered softmax restricted to K and renormalised is the
  softmax of the restricted logits), but the student's mass outside K is not seen: only its
  logits at the k ids get a gradient.
* ``"bucket"``: k + 1 classes, the k ids and one bucket for the rest. Teacher:
  (exp(values), r) with r = 1 − Σ exp(values); student: (q_K, 1 − Σ q_K) with q = softmax(s)
  over its whole vocabulary. These are softened by T as k + 1 classes (softmax of their
  log-probabilities over T), so at T = 1 it is the divergence of the bucketed distributions
  exactly; at T ≠ 1 the bucket is softened as one class, not as its members would be (their
  logits are not known). With k = V_s (nothing outside) both buckets are empty and it equals
  the full divergence; a teacher bucket of 0 mass (values whose probabilities sum to 1) with
  a student bucket of positive mass makes the reverse-type KLs +inf, as they are.

``reduction="mean"`` divides the sum over kept tokens by ``num_items`` when given (the global
count of kept tokens, so gradient accumulation and data parallel ranks normalise like one big
batch) else by the local count of kept tokens; ``"sum"`` sums them; ``"none"`` returns ℓ per
token (0 at ignored ones). With every token ignored the loss is 0 with zero gradients, not NaN.

This materialises the (N, V) logits: it is the plain formula that the chunked native path
(:mod:`kdfast.ops.fused_linear_kd`) is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import DIVERGENCES as CORE_DIVERGENCES
from kdfast.reference.softmax_kl import NEG_INF, log_mixture, row_kl, softmax_kl

DIVERGENCES = (*CORE_DIVERGENCES, "skew_forward", "skew_reverse", "tv")
TOPK_TAILS = ("renormalize", "bucket")


def kept_tokens(labels: torch.Tensor | None, num_tokens: int, ignore_index: int,
                device: torch.device) -> torch.Tensor:
    """(N,) bool: the tokens that count (labels != ignore_index; all without labels)."""
    if labels is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return labels.reshape(-1) != ignore_index


def mean_denominator(kept: torch.Tensor, num_items) -> torch.Tensor | int:
    """What ``reduction="mean"`` divides by: ``num_items``, else the kept count (at least 1,
    so that an all-ignored batch gives 0, not 0/0)."""
    if num_items is not None:
        return num_items
    return kept.sum().clamp_min(1)


def capped(logits: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """c · tanh(σ z / c), or σ z without a cap (σ = logit_scale, c = softcap)."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def padded(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) logits: the missing classes appended as −inf columns (probability 0)."""
    missing = vocab - logits.shape[1]
    return logits if missing == 0 else F.pad(logits, (0, missing), value=NEG_INF)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                    divergence: str = "forward", beta: float = 0.5,
                    alpha: float = 0.1) -> torch.Tensor:
    """T² · D(softmax(t/T), softmax(s/T)) per row, D any of :data:`DIVERGENCES`: (rows,)."""
    if divergence in CORE_DIVERGENCES:
        return softmax_kl(student, teacher, temperature, divergence, beta)
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    if divergence == "tv":
        per_row = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=1)
    elif divergence == "skew_forward":
        per_row = row_kl(log_p, log_q if alpha == 0 else log_mixture(log_p, log_q, alpha))
    else:
        per_row = row_kl(log_q, log_p if alpha == 0 else log_mixture(log_q, log_p, alpha))
    return temperature**2 * per_row


def log_mass_outside(log_q: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ indices} q_v per row of log-probabilities (rows, 1); −inf, with a zero
    gradient, where the ids cover the row."""
    outside = log_q.scatter(1, indices, NEG_INF)
    empty = (outside == NEG_INF).all(dim=1, keepdim=True)
    total = torch.logsumexp(torch.where(empty, 0.0, outside), dim=1, keepdim=True)
    return torch.where(empty, NEG_INF, total)


def teacher_log_tail(values: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(1 − Σ exp(values)) per row (rows, 1): the teacher's mass outside its k ids; −inf
    when the ids cover the vocabulary (k = vocab) or the values' mass reaches 1."""
    total = torch.logsumexp(values, dim=1, keepdim=True)
    if values.shape[1] == vocab:
        return torch.full_like(total, NEG_INF)
    return torch.where(total < 0, torch.log(-torch.expm1(total.clamp_max(0.0))), NEG_INF)


def topk_logits(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                topk_tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (student, teacher) rows the divergence compares for a top-k teacher: the logits
    at the k ids (``"renormalize"``, (rows, k)) or the log-probabilities of the k ids and the
    bucket of the rest (``"bucket"``, (rows, k + 1))."""
    if topk_tail == "renormalize":
        return student.gather(1, indices), values
    return bucket_rows(F.log_softmax(student, dim=1), values, indices)


def bucket_rows(log_q: torch.Tensor, values: torch.Tensor, indices: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``"bucket"``'s (rows, k + 1) log-probabilities of the k ids and the rest, of the
    student (from its log-probabilities ``log_q`` (rows, V_s)) and of the teacher."""
    student_rows = torch.cat([log_q.gather(1, indices), log_mass_outside(log_q, indices)], 1)
    teacher_rows = torch.cat([values, teacher_log_tail(values, log_q.shape[1])], 1)
    return student_rows, teacher_rows


def fused_linear_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    teacher_hidden: torch.Tensor | None = None,
                    teacher_weight: torch.Tensor | None = None, *,
                    teacher_logits: torch.Tensor | None = None,
                    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                    student_bias: torch.Tensor | None = None,
                    teacher_bias: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, divergence: str = "forward",
                    beta: float = 0.5, alpha: float = 0.1, temperature: float = 1.0,
                    soft_weight: float = 1.0, hard_weight: float = 0.0,
                    ignore_index: int = -100, num_items=None, reduction: str = "mean",
                    topk_tail: str = "renormalize", logit_scale: float = 1.0,
                    softcap: float | None = None, teacher_logit_scale: float = 1.0,
                    teacher_softcap: float | None = None,
                    scale_by_temperature_squared: bool = True) -> torch.Tensor:
    """The loss above, eagerly: a scalar, or per token (the hidden states' leading shape)
    for ``reduction="none"``; in the accumulation dtype (fp32 for fp16/bf16 inputs)."""
    token_shape = student_hidden.shape[:-1]
    hidden = upcast_low_precision(student_hidden.reshape(-1, student_hidden.shape[-1]))
    bias = None if student_bias is None else upcast_low_precision(student_bias)
    student = capped(F.linear(hidden, upcast_low_precision(student_weight), bias),
                     logit_scale, softcap)
    if teacher_topk is not None:
        values, indices = teacher_topk
        values = upcast_low_precision(values.reshape(-1, values.shape[-1])).detach()
        student_rows, teacher_rows = topk_logits(
            student, values, indices.reshape(values.shape).long(), topk_tail)
    else:
        if teacher_logits is not None:
            teacher = upcast_low_precision(teacher_logits.reshape(-1, teacher_logits.shape[-1]))
        else:
            t_bias = None if teacher_bias is None else upcast_low_precision(teacher_bias)
            t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            teacher = capped(F.linear(upcast_low_precision(t_hidden),
                                      upcast_low_precision(teacher_weight), t_bias),
                             teacher_logit_scale, teacher_softcap)
        vocab = max(student.shape[1], teacher.shape[1])
        student_rows, teacher_rows = padded(student, vocab), padded(teacher.detach(), vocab)
    kept = kept_tokens(labels, student.shape[0], ignore_index, student.device)
    per_token = soft_weight * divergence_rows(student_rows, teacher_rows, temperature,
                                              divergence, beta, alpha)
    if not scale_by_temperature_squared:
        per_token = per_token / temperature**2
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

"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022), as mdistiller's
``dkd_loss`` computes it.

With p = softmax(z / T) over the C classes and g the gold (label) class of a sample:

* TCKD, the target-class term: T² · KL(b_t ‖ b_s) of the binary distributions
  b = (p_g, 1 − p_g) (gold vs every other class);
* NCKD, the non-target term: T² · KL(p̂_t ‖ p̂_s), p̂ = softmax over the C − 1 non-gold
  classes only (the gold logit removed);

DKD = α · TCKD + β · NCKD per sample. Only the (B, C) logits and the labels enter.

Numerics: the binary distributions are taken in log space (log p_g = z_g/T − lse(z/T),
log(1 − p_g) = lse over the other classes − lse(z/T)), so a confident teacher (p_g → 1)
gives an exact log(1 − p_g), where mdistiller's log(Σ p) of the softmax rounds it to
log 0 = −inf. The gold column of NCKD is set to −inf in both rows, the exact limit of
mdistiller's ``z/T − 1000·gold`` (which leaves e^−1000 ≈ 0 of mass on it); the two agree to
rounding for logits of normal size (tests/reference/test_dkd.py).
"""

from __future__ import annotations

import torch

from kdfast.reference.numerics import upcast_low_precision
from kdfast.reference.softmax_kl import NEG_INF, kl_terms, softmax_kl


def without_gold(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The (B, C) logits with each sample's gold column ``targets[b]`` at −inf: it then has
    probability 0 and gradient 0 in the ``"softmax_kl"`` core (an entry −inf in both rows
    contributes nothing), and the logsumexp of the row is that of the other classes."""
    return logits.scatter(1, targets[:, None], NEG_INF)


def log_binary(logits: torch.Tensor, others: torch.Tensor, targets: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """(B, 2) log-probabilities (log p_g, log(1 − p_g)) of p = softmax(logits / T);
    ``others`` is ``without_gold(logits, targets)``."""
    logits, others = upcast_low_precision(logits), upcast_low_precision(others)
    log_total = torch.logsumexp(logits / temperature, dim=1, keepdim=True)
    log_gold = logits.gather(1, targets[:, None]) / temperature
    log_others = torch.logsumexp(others / temperature, dim=1, keepdim=True)
    return torch.cat([log_gold, log_others], dim=1) - log_total


def tckd(student: torch.Tensor, teacher: torch.Tensor, student_others: torch.Tensor,
         teacher_others: torch.Tensor, targets: torch.Tensor,
         temperature: float) -> torch.Tensor:
    """T² · KL((p_t,g, 1 − p_t,g) ‖ (p_s,g, 1 − p_s,g)) per sample, (B,); the ``*_others``
    are the logits :func:`without_gold`."""
    log_b_s = log_binary(student, student_others, targets, temperature)
    log_b_t = log_binary(teacher, teacher_others, targets, temperature)
    return temperature**2 * kl_terms(log_b_t, log_b_s).sum(dim=1)


def nckd(student_others: torch.Tensor, teacher_others: torch.Tensor,
         temperature: float) -> torch.Tensor:
    """T² · KL(p̂_t ‖ p̂_s) over the non-gold classes per sample, (B,), from the logits
    :func:`without_gold`."""
    return softmax_kl(student_others, teacher_others, temperature)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             targets: torch.Tensor, temperature: float = 4.0, alpha: float = 1.0,
             beta: float = 8.0) -> torch.Tensor:
    """α · TCKD + β · NCKD per sample, (B,); ``targets`` are int64 class indices and the
    logits have at least two classes."""
    student_others = without_gold(student_logits, targets)
    teacher_others = without_gold(teacher_logits, targets)
    return (alpha * tckd(student_logits, teacher_logits, student_others, teacher_others,
                         targets, temperature)
            + beta * nckd(student_others, teacher_others, temperature))

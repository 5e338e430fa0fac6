"""Row-wise softmax divergences of temperature-softened logits (docs/design.md, "Row-wise
softmax-KL"): the reference of the ``"softmax_kl"`` core behind KD, DML and BAN.

For (N, L) rows of student logits s and teacher logits t and a temperature T,
``p_s = softmax(s / T)`` and ``p_t = softmax(t / T)`` per row, and per row

* ``"forward"``: KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s) (Hinton KD),
* ``"reverse"``: KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t),
* ``"jsd"``: the generalised Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024),
  as Liger-Kernel's ``LigerJSD`` and TRL's ``generalized_jsd_loss`` compute it:
  JSD(β) = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m),  m = β p_t + (1 − β) p_s,
  β ∈ [0, 1]. β = 0.5 is the symmetric JSD. At the ends the mixture formula is identically 0
  (m equals one of the two), so, as in both libraries, β = 0 is *defined* as forward KL and
  β = 1 as reverse KL (the limits of JSD(β)/β and JSD(β)/(1 − β)).

every divergence times T² (the KD convention: the gradient's scale then does not depend on T;
d/ds of forward KL·T² is T (p_s − p_t)). Returned per row, shape (N,), in the accumulation
dtype (float32 for float16/bfloat16 inputs, else the inputs' dtype).

Masked logits (padded classes, a vocabulary mask): an entry that is −inf in both rows has
probability 0 in both and contributes 0 with a gradient of exactly 0 (the limit of x log x,
never the 0·log 0 = NaN of the plain product); a −inf on one side where the divergence's first
argument has mass gives +inf for the KLs, as the KL is (the JSD stays finite). NaN and +inf
logits give NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision

DIVERGENCES = ("forward", "reverse", "jsd")

NEG_INF = float("-inf")


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p − log q) entry-wise, 0 where p = 0 (log p = −inf exactly).

    Double ``where``: the masked entries are replaced by 0 *before* the product too, so the
    unused branch computes nothing infinite and passes no NaN into the gradient. A NaN log p
    is not −inf, so it stays in (and the loss is NaN).
    """
    has_mass = log_p != NEG_INF
    safe_p = torch.where(has_mass, log_p, 0.0)
    safe_q = torch.where(has_mass, log_q, 0.0)
    return torch.where(has_mass, safe_p.exp() * (safe_p - safe_q), 0.0)


def row_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of log-probabilities: shape (N,)."""
    return kl_terms(log_p, log_q).sum(dim=1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log(β p + (1 − β) q) for 0 < β < 1; −inf (gradient 0) where both p and q are 0.

    ``logaddexp`` of two −inf has a NaN gradient, so such entries are computed on zeros and
    replaced afterwards.
    """
    both_masked = (log_p == NEG_INF) & (log_q == NEG_INF)
    safe_p = torch.where(both_masked, 0.0, log_p)
    safe_q = torch.where(both_masked, 0.0, log_q)
    mixed = torch.logaddexp(safe_p + math.log(beta), safe_q + math.log1p(-beta))
    return torch.where(both_masked, NEG_INF, mixed)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """T² · divergence(p_t, p_s) per row of (N, L) logits, p = softmax(logits / T): (N,).

    ``divergence`` is ``"forward"`` (KL(p_t ‖ p_s)), ``"reverse"`` (KL(p_s ‖ p_t)) or
    ``"jsd"`` (generalised JSD(β); β = 0 and β = 1 are forward and reverse KL), see the
    module docstring.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; "
                         f"got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_p_s = F.log_softmax(upcast_low_precision(student) / temperature, dim=1)
    log_p_t = F.log_softmax(upcast_low_precision(teacher) / temperature, dim=1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse"
    if divergence == "forward":
        per_row = row_kl(log_p_t, log_p_s)
    elif divergence == "reverse":
        per_row = row_kl(log_p_s, log_p_t)
    else:
        log_m = log_mixture(log_p_t, log_p_s, beta)
        per_row = beta * row_kl(log_p_t, log_m) + (1.0 - beta) * row_kl(log_p_s, log_m)
    return temperature**2 * per_row

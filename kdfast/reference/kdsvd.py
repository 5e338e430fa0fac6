"""Self-supervised KD with singular value decomposition, KDSVD (Lee et al., ECCV 2018), as
RepDistiller's ``KDSVD(k=1)``.

Per feature map F (B, C, H, W), X = F as (B, H*W, C), X = U S V^T (thin SVD):
* the teacher keeps its top k right singular vectors V_t (B, C, k) and its top k singular
  values, normalised to a unit vector s_t (B, k); the student keeps its top k + 3 vectors;
* sign alignment: for each teacher vector the student vector with the largest |cosine| is
  picked, times the sign of that cosine (V_s becomes (B, C, k));
* both are scaled by the teacher's s_t: W = V diag(s_t);
* between consecutive maps l-1, l (same channel counts for student and teacher at each map):
  R_{b,i,j,m} = exp(-(W^l_{b,i,m} - W^{l-1}_{b,j,m})^2 / 8), and the loss of the pair is
  sum over i, j, m of (R_s - R_t)^2 (non-finite entries counted as 0), divided by B.
The teacher side is detached. Every vector is also passed through F.normalize (a no-op on
singular vectors up to rounding), and non-finite SVD outputs are set to 0, as RepDistiller
does. RepDistiller reshapes with H*H; here H*W (the same for square maps).

Gradients through an SVD divide by the gaps s_i^2 - s_j^2: they are ill-conditioned where two
singular values (among all of them, not only the top k) nearly coincide.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision

RBF_SCALE = 8.0  # the denominator in exp(-d^2 / 8)
EXTRA_STUDENT_VECTORS = 3  # the student keeps k + 3 candidates for the alignment


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def top_singular(features: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (B, C, n), s (B, n)): the top n right singular vectors of (B, H*W, C), each unit
    norm, and the top n singular values normalised to a unit vector."""
    x = upcast_low_precision(features).flatten(2).transpose(1, 2)
    _, values, vectors_h = torch.linalg.svd(x, full_matrices=False)
    vectors = _finite_or_zero(vectors_h.transpose(1, 2))[:, :, :n]
    values = _finite_or_zero(values)[:, :n]
    return F.normalize(vectors, dim=1), F.normalize(values, dim=1)


def align_signs(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For each teacher vector (columns of (B, C, k)), the student vector (columns of
    (B, C, m)) of largest |cosine| times that cosine's sign: (B, C, k)."""
    cosine = student.transpose(1, 2) @ teacher  # (B, m, k)
    largest = cosine.abs().amax(dim=1, keepdim=True)
    pick = torch.where(cosine.abs() == largest, torch.sign(cosine), torch.zeros_like(cosine))
    return student @ pick


def _rbf(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """exp(-(current_{b,i,m} - previous_{b,j,m})^2 / 8): (B, C_l, C_{l-1}, k)."""
    return torch.exp(-(current.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / RBF_SCALE)


def kdsvd_loss(student_features: Sequence[torch.Tensor],
               teacher_features: Sequence[torch.Tensor], k: int = 1) -> torch.Tensor:
    """Per-sample KDSVD loss, (B,): the sum over consecutive map pairs of
    sum_{i,j,m} (R_s - R_t)^2; its mean is RepDistiller's ``sum(KDSVD(k)(g_s, g_t))``."""
    total, previous = None, None
    for f_s, f_t in zip(student_features, teacher_features, strict=True):
        with torch.no_grad():
            v_t, s_t = top_singular(f_t, k)
        v_s, _ = top_singular(f_s, k + EXTRA_STUDENT_VECTORS)
        v_s = align_signs(v_s, v_t)
        scale = s_t.unsqueeze(1)
        current = (v_s * scale, v_t * scale)
        if previous is not None:
            squared = (_rbf(current[0], previous[0]) - _rbf(current[1], previous[1])).pow(2)
            pair = _finite_or_zero(squared).flatten(1).sum(dim=1)
            total = pair if total is None else total + pair
        previous = current
    return total

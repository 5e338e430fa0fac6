"""Relational knowledge distillation, RKD (Park et al., CVPR 2019): distance + angle.

Embeddings x_1..x_B (rows of a (B, D) matrix; feature maps flattened per sample):
* distance: psi_D(i, j) = ||x_i - x_j|| / mu, mu = mean of the positive off-diagonal
  distances; term = mean over all B^2 entries of smooth_l1(psi_D^s, psi_D^t) (beta = 1).
* angle: psi_A(i, j, k) = <e_ij, e_kj>, e_ij = (x_i - x_j) / ||x_i - x_j||; term = mean over
  all B^3 entries of smooth_l1(psi_A^s, psi_A^t).
loss = distance_weight * distance + angle_weight * angle (25 and 50 in RepDistiller).

Numerics: the relations are computed in float32 (float64 stays float64) from exact
differences, not the |a|^2 + |b|^2 - 2ab expansion. Degenerate entries (i = j, or two identical
rows) have distance 0 and direction 0 and pass no gradient; the peers' sqrt(clamp(., 1e-12))
and F.normalize give such entries gradients of order 1e6..1e12. Only an exactly zero distance
is degenerate: a NaN or infinite one (a non-finite input) is kept, so the loss is NaN. The
teacher's relations are computed without gradient (detached), like the peers. Memory
O(B^2 D) (the differences) and O(B^3) (the angles), as in the peers' angle term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.reference.numerics import upcast_low_precision


def pairwise_relations(embeddings: torch.Tensor, distances: bool = True, angles: bool = True
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean-normalised distances (B, B) and angles (B, B, B) of (B, ...) embeddings.

    ``angles[j, i, k] = <e_ij, e_kj>`` (anchor j first, as in the peers' ``bmm``). Either is
    None when not asked for.
    """
    x = upcast_low_precision(embeddings).flatten(1)
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[j, i] = x_i - x_j
    squared = diff.pow(2).sum(dim=-1)
    apart = squared != 0  # False on the diagonal and for identical rows; True for NaN
    # sqrt only where positive: no infinite derivative at 0 (the double-where pattern).
    norm = torch.where(apart, squared, torch.ones_like(squared)).sqrt()
    normalised_distances = angle_matrix = None
    if distances:
        dist = torch.where(apart, norm, torch.zeros_like(norm))
        mean = dist.sum() / apart.sum().clamp_min(1)
        normalised_distances = dist / torch.where(mean == 0, torch.ones_like(mean), mean)
    if angles:
        directions = torch.where(apart.unsqueeze(-1), diff / norm.unsqueeze(-1),
                                 torch.zeros_like(diff))
        angle_matrix = torch.bmm(directions, directions.transpose(1, 2))
    return normalised_distances, angle_matrix


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    """Per-anchor RKD loss, shape (B,); its mean is the RKD loss.

    Entry i is ``distance_weight * mean_j smooth_l1(psi_D^s(i, j), psi_D^t(i, j)) +
    angle_weight * mean_{a, k} smooth_l1(psi_A^s(a, i, k), psi_A^t(a, i, k))``. A weight of
    0 skips its term.
    """
    want_distance, want_angle = distance_weight != 0, angle_weight != 0
    s_dist, s_angle = pairwise_relations(student, want_distance, want_angle)
    with torch.no_grad():
        t_dist, t_angle = pairwise_relations(teacher, want_distance, want_angle)
    terms = []
    if want_distance:
        distance = F.smooth_l1_loss(s_dist, t_dist.to(s_dist.dtype), reduction="none")
        terms.append(distance_weight * distance.mean(dim=1))
    if want_angle:
        angle = F.smooth_l1_loss(s_angle, t_angle.to(s_angle.dtype), reduction="none")
        terms.append(angle_weight * angle.flatten(1).mean(dim=1))
    return sum(terms[1:], terms[0])

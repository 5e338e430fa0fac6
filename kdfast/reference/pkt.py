"""Probabilistic knowledge transfer, PKT (Passalis & Tefas, ECCV 2018), as RepDistiller's `PKT`.

Embeddings q_i (the inputs flattened per sample), per side:
* cosine similarities K_ij = <q_i, q_j> / ((||q_i|| + eps)(||q_j|| + eps)) (the shared
  batch Gram of :func:`kdfast.reference.gram.cosine_gram`),
* moved to [0, 1]: A = (K + 1) / 2, and made conditional probabilities by rows:
  P_ij = A_ij / sum_k A_ik,
loss = mean over all B^2 entries of P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)), eps = 1e-7.
"""

import torch

from kdfast.reference.gram import cosine_gram

PKT_EPS = 1e-7  # RepDistiller's and torchdistill's eps, in the norms and in the log


def conditional_probabilities(features: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """P (B, B): the cosine similarities moved to [0, 1], each row divided by its sum."""
    affinity = (cosine_gram(features, eps) + 1.0) / 2.0
    return affinity / affinity.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = PKT_EPS
             ) -> torch.Tensor:
    """Per-row PKT loss, (B,): row i is sum_j P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)) / B,
    whose mean is the loss."""
    p_s = conditional_probabilities(student, eps)
    p_t = conditional_probabilities(teacher, eps).to(p_s.dtype)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(dim=1) / student.shape[0]

"""Contrastive representation distillation, CRD (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; the NCE form of RepDistiller's crd/criterion.py and memory.py).

Both networks' embeddings (l2-normalised, feat_dim) are scored against rows of the other's
memory bank: for an anchor v and the K + 1 bank rows m_0 (the sample's own, the positive) and
m_1..m_K (negatives), P_k = exp(<m_k, v> / T) / Z, with Z the normalisation constant
(estimated once, on the first batch, as n_data times the mean of the exp scores). NCE with a
uniform noise distribution over the n_data samples (noise mass K / n_data):

    loss = -log(P_0 / (P_0 + K/n_data + eps)) - sum_k log((K/n_data) / (P_k + K/n_data + eps))

with eps = 1e-7, once with the student's embedding as anchor over the teacher's bank and once
the other way round, added. RepDistiller divides the sum over the batch by the batch size: the
batch mean of these per-sample values.
"""

import torch

from kdfast.reference.numerics import upcast_low_precision

NCE_EPS = 1e-7


def exp_scores(anchor: torch.Tensor, bank_rows: torch.Tensor, temperature: float
               ) -> torch.Tensor:
    """exp(<m_k, v> / T) for anchors (B, D) and bank rows (B, K + 1, D): (B, K + 1)."""
    scores = torch.einsum("bkd,bd->bk", upcast_low_precision(bank_rows),
                          upcast_low_precision(anchor))
    return torch.exp(scores / temperature)


def estimate_normalizer(anchor: torch.Tensor, bank_rows: torch.Tensor, temperature: float,
                        n_data: int) -> torch.Tensor:
    """Z = n_data x the mean exp score of this batch (0-d, detached), as RepDistiller sets it
    on its first batch."""
    return exp_scores(anchor.detach(), bank_rows.detach(), temperature).mean() * n_data


def nce_loss(probabilities: torch.Tensor, n_data: int) -> torch.Tensor:
    """Per-sample NCE loss (B,) of (B, K + 1) probabilities, the positive in column 0."""
    noise = (probabilities.shape[1] - 1) / n_data
    positive, negatives = probabilities[:, 0], probabilities[:, 1:]
    log_positive = torch.log(positive / (positive + noise + NCE_EPS))
    log_negatives = torch.log(noise / (negatives + noise + NCE_EPS))
    return -(log_positive + log_negatives.sum(dim=1))


def crd_loss(student: torch.Tensor, teacher: torch.Tensor, student_bank: torch.Tensor,
             teacher_bank: torch.Tensor, n_data: int, temperature: float,
             student_normalizer, teacher_normalizer) -> torch.Tensor:
    """Per-sample CRD loss (B,): the student's embedding against the teacher's bank rows
    (normalised by ``student_normalizer``) plus the teacher's against the student's bank rows
    (``teacher_normalizer``). Normalizers are numbers or 0-d tensors."""
    student_side = exp_scores(student, teacher_bank, temperature) / student_normalizer
    teacher_side = exp_scores(teacher, student_bank, temperature) / teacher_normalizer
    return nce_loss(student_side, n_data) + nce_loss(teacher_side, n_data)

"""Similarity-preserving KD (Tung & Mori, ICCV 2019).

Q = features flattened to B x D (D = C*H*W, may differ between student and teacher),
G = rownormalise(Q Q^T) (B x B, each row divided by max(||row||_2, 1e-12)),
loss = ||G_t - G_s||_F^2 / B^2.
"""

import torch

from kdfast.reference.gram import batch_gram
from kdfast.reference.numerics import NORM_EPS, normalize


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = rownormalise(Q Q^T), shape (B, B), for (B, ...) features (float32 for half inputs).

    The row norms never overflow while Q Q^T is finite
    (:func:`~kdfast.reference.numerics.normalize`); an overflowing Q Q^T gives NaN.
    """
    return normalize(batch_gram(features), dim=1, eps=NORM_EPS)


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row SP loss, shape (B,): row i is sum_j (G_t - G_s)_ij^2 / B.

    The mean over rows is ||G_t - G_s||_F^2 / B^2, the loss of the paper.
    """
    diff = similarity_matrix(teacher) - similarity_matrix(student)
    return diff.pow(2).sum(dim=1) / student.shape[0]

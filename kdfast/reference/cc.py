"""Correlation congruence, CC (Peng et al., ICCV 2019).

Default, torchdistill's ``CCKDLoss``: per side a B x B correlation matrix of the embeddings
q_i (inputs flattened per sample) built on the batch Gram G = Q Q^T
(:func:`kdfast.reference.gram.batch_gram`):
* ``"gaussian"``: the order-P Taylor expansion of the Gaussian RBF exp(-gamma ||q_i - q_j||^2)
  for unit-norm q: K = exp(-2 gamma) sum_{p=0}^{P} (2 gamma)^p / p! G^p (entry-wise powers),
* ``"bilinear"``: K = G;
loss = ||K_s - K_t||_F / B^2 (torch.dist, ``reduction='batchmean'``). ``squared=True`` gives the
paper's ||K_s - K_t||_F^2 / B^2.

Option, RepDistiller's ``Correlation`` (code the CRD authors received from the CC authors):
with delta = |s - t| (same shapes), loss = mean over i < B-1 of sum_d delta_i,d delta_{i+1},d,
the product of the residuals of consecutive samples; no kernel matrix at all.
"""

import math

import torch

from kdfast.reference.gram import batch_gram
from kdfast.reference.numerics import upcast_low_precision

KERNELS = ("gaussian", "bilinear")


def correlation_matrix(features: torch.Tensor, kernel: str = "gaussian", gamma: float = 0.4,
                       order: int = 2) -> torch.Tensor:
    """K (B, B) of (B, ...) features: the Gram or its Gaussian-kernel Taylor expansion."""
    gram = batch_gram(features)
    if kernel == "bilinear":
        return gram
    total = torch.ones_like(gram)
    for p in range(1, order + 1):
        total = total + (2.0 * gamma) ** p / math.factorial(p) * gram.pow(p)
    return math.exp(-2.0 * gamma) * total


def cc_kernel_loss(student: torch.Tensor, teacher: torch.Tensor, kernel: str = "gaussian",
                   gamma: float = 0.4, order: int = 2, squared: bool = False) -> torch.Tensor:
    """Per-row torchdistill CC loss, (B,), whose mean is ||D||_F / B^2, D = K_s - K_t
    (``squared``: ||D||_F^2 / B^2).

    Row i is ||D_i||^2 / (B ||D||_F) (``squared``: ||D_i||^2 / B): the rows share the norm, a
    batch statistic. A zero D gives zero rows with zero gradient.
    """
    diff = (correlation_matrix(student, kernel, gamma, order)
            - correlation_matrix(teacher, kernel, gamma, order))
    rows = diff.pow(2).sum(dim=1)
    batch = student.shape[0]
    if squared:
        return rows / batch
    total = rows.sum()
    nonzero = total > 0
    norm = torch.where(nonzero, total, torch.ones_like(total)).sqrt()  # no sqrt'(0)
    return torch.where(nonzero, rows / (batch * norm), torch.zeros_like(rows))


def cc_consecutive_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row RepDistiller ``Correlation`` loss, (B,), whose mean is
    mean_{i < B-1} sum_d |s - t|_i,d |s - t|_{i+1},d (B >= 2).

    Row i < B-1 holds B/(B-1) sum_d delta_i,d delta_{i+1},d and row B-1 holds 0.
    """
    delta = (upcast_low_precision(student) - upcast_low_precision(teacher)).abs().flatten(1)
    batch = delta.shape[0]
    pairs = (delta[:-1] * delta[1:]).sum(dim=1) * (batch / (batch - 1))
    return torch.cat([pairs, pairs.new_zeros(1)])


VARIANTS = ("torchdistill", "repdistiller")


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, variant: str = "torchdistill",
            kernel: str = "gaussian", gamma: float = 0.4, order: int = 2,
            squared: bool = False) -> torch.Tensor:
    """Per-row CC loss, (B,), of the ``variant``: :func:`cc_kernel_loss` or
    :func:`cc_consecutive_loss` (which takes none of the kernel options)."""
    if variant == "repdistiller":
        return cc_consecutive_loss(student, teacher)
    return cc_kernel_loss(student, teacher, kernel, gamma, order, squared)

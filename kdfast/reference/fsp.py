"""Flow of solution procedure, FSP (Yim et al., CVPR 2017).

For two layers a, b of one network at the same H, W (per sample X_a: C_a x HW, X_b: C_b x HW):
G = X_a X_b^T / HW, a C_a x C_b matrix. Per pair of layers, the loss of a sample is the mean
over C_a*C_b of (G_s - G_t)^2; the losses of several pairs are summed.
"""

import torch

from kdfast.reference.numerics import upcast_low_precision


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G = X_a X_b^T / HW, shape (B, C_a, C_b), from (B, C_a, H, W) and (B, C_b, H, W).

    One batched GEMM: O(B*C_a*C_b) memory, never the B*C_a*C_b*HW broadcast.
    """
    xa = upcast_low_precision(a).flatten(2)
    xb = upcast_low_precision(b).flatten(2)
    return torch.bmm(xa, xb.transpose(1, 2)) / xa.shape[-1]


def fsp_pair_loss(student_a: torch.Tensor, student_b: torch.Tensor,
                  teacher_a: torch.Tensor, teacher_b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over C_a*C_b of (G_s - G_t)^2 for one pair of layers, shape (B,).

    Within a pair, a and b share H, W; the student's H, W may differ from the teacher's
    (each G is divided by its own HW). Channels match: student C_a == teacher C_a, C_b too.
    """
    diff = fsp_matrix(student_a, student_b) - fsp_matrix(teacher_a, teacher_b)
    return diff.pow(2).flatten(1).mean(dim=1)


def naive_fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G through the B*C_a*C_b*HW broadcast ``(a.unsqueeze(2) * b.unsqueeze(1)).mean(-1)``."""
    xa, xb = a.flatten(2), b.flatten(2)
    return (xa.unsqueeze(2) * xb.unsqueeze(1)).mean(-1)


def naive_fsp_pair_loss(student_a: torch.Tensor, student_b: torch.Tensor,
                        teacher_a: torch.Tensor, teacher_b: torch.Tensor) -> torch.Tensor:
    """:func:`fsp_pair_loss` the way public code computes it (RepDistiller ``compute_fsp``).

    Builds a B*C_a*C_b*HW tensor per matrix: only the benchmark's "naive" provider uses it.
    """
    diff = naive_fsp_matrix(student_a, student_b) - naive_fsp_matrix(teacher_a, teacher_b)
    return diff.pow(2).flatten(1).mean(dim=1)

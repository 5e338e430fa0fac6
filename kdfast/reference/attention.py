"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), activation-based.

a(f) = normalise_HW(mean_C |f|^p): a (B, HW) spatial attention map of unit L2 norm.
"""

import torch

from kdfast.reference.numerics import NORM_EPS, normalize, upcast_low_precision


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """q_hat = Q / max(||Q||, 1e-12) with Q = mean_C |features|^p, shape (B, H*W).

    ||Q|| never overflows while Q is finite (:func:`~kdfast.reference.numerics.normalize`);
    Q itself is +inf where mean_C |f|^p exceeds the dtype, and q_hat is then NaN.
    """
    q = upcast_low_precision(features).abs().pow(p).mean(dim=1).flatten(1)
    return normalize(q, dim=1, eps=NORM_EPS)


def at_loss_from_maps(student_map: torch.Tensor, teacher_map: torch.Tensor,
                      mode: str = "code") -> torch.Tensor:
    """Per-sample AT loss between two (B, HW) attention maps.

    ``"code"`` (RepDistiller): mean over HW of (a_s - a_t)^2, so the batch mean is the mean
    over B*HW. ``"paper"``: ||a_s - a_t||_2 per sample.
    """
    diff = student_map - teacher_map
    if mode == "code":
        return diff.pow(2).mean(dim=1)
    return torch.linalg.vector_norm(diff, dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0,
            mode: str = "code") -> torch.Tensor:
    """Per-sample activation-based AT loss of two (B, C, H, W) maps of equal H, W."""
    return at_loss_from_maps(attention_map(student, p), attention_map(teacher, p), mode)

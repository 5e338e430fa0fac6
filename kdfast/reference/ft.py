"""Factor transfer, FT (Kim et al., NeurIPS 2018): the loss between the translator's factor
(student) and the paraphraser's factor (teacher).

* ``"repdistiller"`` (default, RepDistiller's ``FactorTransfer(p1=2, p2=1)``): each factor map
  F (B, C, H, W) becomes the unit vector phi(F) = normalise(mean_c F^power) (B, H*W), and
  loss = mean over b and the H*W positions of |phi(F_s) - phi(F_t)|.
* ``"paper"`` (the paper's eq. and torchdistill's ``FTLoss(p=1)``): phi(F) = F flattened to
  (B, C*H*W) and normalised, loss = mean over b and the C*H*W entries of |phi(F_s) - phi(F_t)|.
Normalisation divides by max(||.||_2, 1e-12) (an all-zero factor gives 0, not NaN).
"""

import torch

from kdfast.reference.numerics import NORM_EPS, normalize, upcast_low_precision

FT_MODES = ("repdistiller", "paper")


def factor_vector(factor: torch.Tensor, mode: str = "repdistiller", power: float = 2.0
                  ) -> torch.Tensor:
    """phi(F): the unit vector each factor is compared as, (B, H*W) or (B, C*H*W)."""
    f = upcast_low_precision(factor)
    if mode == "repdistiller":
        f = f.pow(power).mean(dim=1)
    return normalize(f.flatten(1), dim=1, eps=NORM_EPS)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor,
            mode: str = "repdistiller", power: float = 2.0) -> torch.Tensor:
    """Per-sample FT loss, (B,): mean |phi(F_s) - phi(F_t)| over the factor's entries."""
    diff = factor_vector(student_factor, mode, power) - factor_vector(teacher_factor, mode, power)
    return diff.abs().mean(dim=1)

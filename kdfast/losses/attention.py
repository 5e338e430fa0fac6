"""Activation-based attention transfer (AT): ``at_loss`` and ``ATLoss``."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.attention import CORE, at_per_sample

AT_MODES = ("code", "paper")


def check_at_options(p: float = 2.0, mode: str = "code", pool: bool = True,
                     reduction: str = "mean") -> None:
    _checks.check_positive("p", p, 1.0, inclusive=True)
    _checks.check_choice("mode", mode, AT_MODES)
    _checks.check_flag("pool", pool)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, *, p: float = 2.0,
            mode: str = "code", pool: bool = True, reduction: str = "mean",
            backend: str | None = None) -> torch.Tensor:
    r"""Attention transfer loss (Zagoruyko & Komodakis, 2017).

    .. math::
        a(f) = \frac{Q}{\max(\lVert Q\rVert_2, 10^{-12})},\quad Q = \tfrac1C\textstyle\sum_c |f_c|^p

    ``mode="code"`` (default, RepDistiller): per sample the mean over HW of
    :math:`(a_s - a_t)^2`, so ``reduction="mean"`` gives the mean over B·HW.
    ``mode="paper"``: per sample :math:`\lVert a_s - a_t\rVert_2`.

    Args:
        student: (B, C_s, H_s, W_s) features. teacher: (B, C_t, H_t, W_t); channels may differ.
        p: exponent of the attention map (>= 1), default 2.
        pool: average-pool the larger map to the smaller when H, W differ (default True);
            with False a mismatch raises.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``,
            ``"triton"`` or ``"reference"``.

    Example:
        >>> s, t = torch.randn(8, 64, 16, 16), torch.randn(8, 256, 16, 16)
        >>> kdfast.functional.at_loss(s, t)  # doctest: +SKIP
    """
    check_at_options(p, mode, pool, reduction)
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_batch(student, teacher)
    student, teacher = _checks.promote(student, teacher)
    student, teacher = _checks.match_spatial(student, teacher, pool)
    impl = backends.choose(CORE, backend, student, teacher)
    per_sample = at_per_sample(impl, student, teacher, float(p), mode)
    return _checks.reduce(per_sample, reduction)


class ATLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.at_loss`; ``forward(student, teacher)``."""

    function = staticmethod(at_loss)
    validate = staticmethod(check_at_options)

    def __init__(self, p: float = 2.0, mode: str = "code", pool: bool = True,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(p=p, mode=mode, pool=pool, reduction=reduction, backend=backend)

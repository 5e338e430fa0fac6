"""Neural selectivity transfer (NST): ``nst_loss`` and ``NSTLoss``."""

from __future__ import annotations

import numbers

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.mmd import CORE
from kdfast.reference.nst import KERNELS, check_unbiased_sizes


def check_sigma2(sigma2) -> tuple[float, ...] | str:
    """σ² as the core takes it: ``"mean"`` or a non-empty tuple of positive floats."""
    if isinstance(sigma2, str):
        _checks.check_choice("sigma2", sigma2, ("mean",))
        return sigma2
    if isinstance(sigma2, (list, tuple)):
        if not sigma2:
            raise ValueError("sigma2 must not be an empty list; pass a positive float, a "
                             "non-empty list of them, or 'mean'")
        return tuple(_checks.check_positive(f"sigma2[{i}]", s) for i, s in enumerate(sigma2))
    if isinstance(sigma2, bool) or not isinstance(sigma2, numbers.Real):
        raise TypeError("sigma2 must be a positive float, a non-empty list of them, or "
                        f"'mean'; got {type(sigma2).__name__}")
    return (_checks.check_positive("sigma2", sigma2),)


def check_nst_options(kernel: str = "poly", degree: int = 2, coef: float = 0.0,
                      sigma2=1.0, unbiased: bool = False, teacher_term: bool = True,
                      pool: bool = True, reduction: str = "mean") -> tuple[float, ...] | str:
    """Validates every NST option; returns σ² in the core's form."""
    _checks.check_choice("kernel", kernel, KERNELS)
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral):
        raise TypeError(f"degree must be an int >= 1, got {degree!r}")
    if degree < 1:
        raise ValueError(f"degree must be an int >= 1, got {degree}")
    _checks.check_positive("coef", coef, 0.0, inclusive=True)
    bandwidths = check_sigma2(sigma2)
    _checks.check_flag("unbiased", unbiased)
    _checks.check_flag("teacher_term", teacher_term)
    _checks.check_flag("pool", pool)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
    return bandwidths


def nst_loss(student: torch.Tensor, teacher: torch.Tensor, *, kernel: str = "poly",
             degree: int = 2, coef: float = 0.0, sigma2=1.0, unbiased: bool = False,
             teacher_term: bool = True, pool: bool = True, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""Neural selectivity transfer loss (Huang & Wang, "Like What You Like", 2017).

    Per sample, the m = C_s student channels and the n = C_t teacher channels are two sets of
    samples in R^{H·W}, each channel L2-normalised (divided by max(‖x‖, 1e-12), so an
    all-zero channel stays zero). The loss is their squared MMD:

    .. math::
        \mathrm{MMD}^2 = \frac{1}{m^2}\sum_{i,i'} k(\hat x_i, \hat x_{i'})
          + \frac{1}{n^2}\sum_{j,j'} k(\hat y_j, \hat y_{j'})
          - \frac{2}{mn}\sum_{i,j} k(\hat x_i, \hat y_j)

    with ``kernel="linear"``: :math:`k = \hat x^\top \hat y`; ``"poly"`` (default):
    :math:`k = (\hat x^\top \hat y + c)^d`; ``"rbf"``:
    :math:`k = \sum_{\sigma^2} \exp(-\lVert \hat x - \hat y\rVert^2 / 2\sigma^2)`.
    The defaults (poly, d=2, c=0, teacher term kept, biased) give the value of RepDistiller's
    ``NSTLoss`` (which detaches its teacher term; here it has gradient when the teacher does).

    Args:
        student: (B, C_s, H_s, W_s) features. teacher: (B, C_t, H_t, W_t); channels may differ.
        kernel: ``"linear"`` | ``"poly"`` | ``"rbf"`` (default ``"poly"``).
        degree: d of the poly kernel, an int >= 1 (default 2).
        coef: c of the poly kernel, >= 0 (default 0).
        sigma2: rbf bandwidth σ² > 0 (default 1.0), a non-empty list of them (the kernels are
            summed), or ``"mean"``: per sample the mean squared distance between distinct
            rows of the pooled normalised channels [X̂; Ŷ], detached.
        unbiased: leave the i = i' (j = j') terms out of the within-set means, dividing by
            m(m−1) and n(n−1) (default False; needs >= 2 channels per set used).
        teacher_term: keep the teacher-teacher term (default True); it is constant in the
            student, so dropping it changes the value, not the student's gradient.
        pool: average-pool the larger map to the smaller when H, W differ (default True);
            with False a mismatch raises.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        A scalar, or (B,) with ``reduction="none"``.

    Example:
        >>> s, t = torch.randn(8, 64, 16, 16), torch.randn(8, 256, 8, 8)
        >>> kdfast.functional.nst_loss(s, t, kernel="rbf", sigma2="mean")  # doctest: +SKIP
    """
    bandwidths = check_nst_options(kernel, degree, coef, sigma2, unbiased, teacher_term, pool,
                                   reduction)
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_batch(student, teacher)
    student, teacher = _checks.promote(student, teacher)
    student, teacher = _checks.match_spatial(student, teacher, pool)
    check_unbiased_sizes(student.shape[1], teacher.shape[1], unbiased, teacher_term)
    channel_mmd = backends.choose(CORE, backend, student, teacher).fn
    per_sample = channel_mmd(student, teacher, kernel=kernel, degree=int(degree),
                             coef=float(coef), sigma2=bandwidths, unbiased=unbiased,
                             teacher_term=teacher_term)
    return _checks.reduce(per_sample, reduction)


class NSTLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.nst_loss`; ``forward(student, teacher)``.

    Example:
        >>> criterion = kdfast.NSTLoss(kernel="poly", degree=2)
        >>> criterion(torch.randn(8, 64, 8, 8), torch.randn(8, 128, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(nst_loss)
    validate = staticmethod(check_nst_options)

    def __init__(self, kernel: str = "poly", degree: int = 2, coef: float = 0.0,
                 sigma2=1.0, unbiased: bool = False, teacher_term: bool = True,
                 pool: bool = True, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(kernel=kernel, degree=degree, coef=coef, sigma2=sigma2,
                         unbiased=unbiased, teacher_term=teacher_term, pool=pool,
                         reduction=reduction, backend=backend)

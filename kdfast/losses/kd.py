"""Hinton knowledge distillation on logits: ``kd_loss`` and ``KDLoss``."""

from __future__ import annotations

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.softmax_kl import CORE


def check_kd_options(temperature: float = 4.0, reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def check_logit_pair(student: torch.Tensor, teacher: torch.Tensor,
                     names: tuple[str, str] = ("student_logits", "teacher_logits")) -> None:
    """Both (B, num_classes) floating-point logits of one shape on one device."""
    _checks.check_logits(names[0], student)
    _checks.check_logits(names[1], teacher)
    _checks.check_same_shape(student, teacher, names,
                             fix="both must score the same classes for the same samples")


def kd_per_sample(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                  backend: str | None) -> torch.Tensor:
    """The forward-KL ``"softmax_kl"`` core on validated logits, through the backend policy:
    shape (B,)."""
    return backends.choose(CORE, backend, student, teacher).fn(student, teacher, temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
            temperature: float = 4.0, reduction: str = "mean",
            backend: str | None = None) -> torch.Tensor:
    r"""Knowledge distillation loss (Hinton, Vinyals & Dean, 2015).

    .. math::
        \ell_b = T^2 \sum_c p_t^{(c)} \left(\log p_t^{(c)} - \log p_s^{(c)}\right),\quad
        p = \operatorname{softmax}(z / T)

    i.e. :math:`T^2\,\mathrm{KL}(p_t \,\|\, p_s)` per sample, summed over classes;
    ``reduction="mean"`` averages over the batch (PyTorch's ``"batchmean"``). The gradient of
    the mean w.r.t. the student logits is :math:`(T/B)(p_s - p_t)`. Computed with
    ``log_softmax``, so very large logits stay finite. The teacher is *not* detached: run it
    under ``torch.no_grad()`` (or pass ``teacher_logits.detach()``) unless you want its
    gradient.

    Args:
        student_logits: (B, num_classes) floating-point logits.
        teacher_logits: (B, num_classes), same shape and device.
        temperature: T > 0, default 4.0.
        reduction: ``"mean"`` (batch mean, default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``, ``"triton"``
            or ``"reference"``. The fused ``"softmax_kl"`` core computes the loss and the
            gradient in one pass per row, keeping only the gradient; ``auto`` runs it natively
            on CPU tensors and on Triton for CUDA ones (the reference under ``torch.func``
            transforms).
            One that cannot run the inputs raises ``ValueError`` (through the environment
            variable it falls back to ``auto`` with one warning).

    Example:
        >>> s, t = torch.randn(8, 100), torch.randn(8, 100)
        >>> kdfast.functional.kd_loss(s, t, temperature=4.0)  # doctest: +SKIP
    """
    check_kd_options(temperature, reduction)
    check_logit_pair(student_logits, teacher_logits)
    student_logits, teacher_logits = _checks.promote(student_logits, teacher_logits)
    per_sample = kd_per_sample(student_logits, teacher_logits, float(temperature), backend)
    return _checks.reduce(per_sample, reduction)


class KDLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.kd_loss`; ``forward(student_logits,
    teacher_logits)``.

    Defaults: ``temperature=4.0``, ``reduction="mean"`` (batch mean of T^2 * KL).

    Example:
        >>> criterion = kdfast.KDLoss(temperature=4.0)
        >>> loss = criterion(student(x), teacher(x).detach())  # doctest: +SKIP
    """

    function = staticmethod(kd_loss)
    validate = staticmethod(check_kd_options)

    def __init__(self, temperature: float = 4.0, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

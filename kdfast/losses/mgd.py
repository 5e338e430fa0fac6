"""Masked generative distillation: ``mgd_loss`` and the trainable ``MGDLoss`` (Yang et al.,
"Masked Generative Distillation", ECCV 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import OptionAttributes
from kdfast.losses.fitnet import apply_connector
from kdfast.ops.mgd import CORE
from kdfast.reference.mgd import random_spatial_mask


def check_mgd_options(alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65,
                      reduction: str = "mean") -> None:
    _checks.check_positive("alpha_mgd", alpha_mgd, inclusive=True)
    if _checks.check_positive("lambda_mgd", lambda_mgd, inclusive=True) > 1.0:
        raise ValueError(f"lambda_mgd must be <= 1 (the fraction of positions masked), got "
                         f"{lambda_mgd}")
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def mgd_loss(student: torch.Tensor, teacher: torch.Tensor, generation: Callable, *,
             align: Callable | None = None, alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65,
             generator: torch.Generator | None = None, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""Masked generative distillation (Yang et al., ECCV 2022).

    .. math::
        \ell_b = \alpha \sum_{c,h,w}
            \big(G(M \odot a(s)) - t\big)^2_{b,c,h,w},\qquad
        M_{b,1,h,w} = [u_{b,h,w} \le 1 - \lambda],\ u \sim U[0, 1)

    with :math:`a` the ``align`` module (identity when None), :math:`G` the ``generation``
    block and M a random spatial mask shared by the channels (a position is dropped with
    probability λ). ``reduction="mean"`` averages over the batch: mmrazor's ``MGDLoss``
    (``MSELoss(reduction="sum") / N · alpha_mgd``) on its ``MGDConnector``'s output.
    Defaults follow mmrazor: ``alpha_mgd=2e-5``, ``lambda_mgd=0.65``. The mask is drawn on
    the CPU (from ``generator``, or the global generator as in mmrazor) and moved to the
    features' device, so a seeded generator gives the same mask on every device.
    :class:`kdfast.MGDLoss` owns ``align`` and ``generation`` (the trainable parts).

    Args:
        student: (N, C_s, H, W) student features.
        teacher: (N, C_t, H, W) teacher features.
        generation: the generation block (a module mapping the masked, aligned student map
            to the teacher's shape), e.g. ``kdfast.MGDLoss(...).generation``.
        align: maps the student to the teacher's channels (a 1x1 conv), or None (default)
            when they already match.
        alpha_mgd: the weight α >= 0, default 2e-5.
        lambda_mgd: the masked fraction λ in [0, 1], default 0.65.
        generator: a CPU ``torch.Generator`` for the mask (default None: the global one).
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (N,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core; ``"native"`` and
            ``"triton"`` raise).

    Example:
        >>> mgd = kdfast.MGDLoss(64, 128, seed=0)
        >>> loss = mgd(torch.randn(2, 64, 16, 16), torch.randn(2, 128, 16, 16))  # doctest: +SKIP
    """
    check_mgd_options(alpha_mgd, lambda_mgd, reduction)
    if not callable(generation):
        raise TypeError("generation must be a callable such as an nn.Module (the generation "
                        f"block, e.g. kdfast.MGDLoss(...).generation), got "
                        f"{type(generation).__name__}")
    _checks.check_features("student", student)
    _checks.check_features("teacher", teacher)
    _checks.check_same_batch(student, teacher)
    aligned = apply_connector("student", student, align)
    fix = ("pass align= (a 1x1 conv to the teacher's channels) or use kdfast.MGDLoss, which "
           "builds one")
    name = "student" if align is None else "align(student)"
    _checks.check_same_shape(aligned, teacher, (name, "teacher"), fix)
    n, _, h, w = aligned.shape
    mask = random_spatial_mask(n, h, w, float(lambda_mgd), generator)
    generated = apply_connector("masked student", aligned * mask.to(aligned), generation)
    _checks.check_same_shape(generated, teacher, ("generation(masked student)", "teacher"),
                             "the generation block must keep the teacher's shape")
    generated, teacher = _checks.promote(generated, teacher)
    core = backends.choose(CORE, backend, generated, teacher).fn
    return _checks.reduce(core(generated, teacher, float(alpha_mgd)), reduction)


def make_generation_block(channels: int) -> nn.Sequential:
    """MGD's generation block: 3x3 conv, ReLU, 3x3 conv, ``channels`` -> ``channels``
    (padding 1, sizes kept)."""
    return nn.Sequential(nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, kernel_size=3, padding=1))


class MGDLoss(OptionAttributes, nn.Module):
    """MGD with its trainable parts (mmrazor's ``MGDConnector`` + ``MGDLoss`` in one module);
    ``forward(student, teacher)`` = :func:`kdfast.functional.mgd_loss` with this module's
    ``align`` and ``generation``.

    Args:
        student_channels, teacher_channels: C_s, C_t. ``self.align`` is a 1x1 conv C_s -> C_t
            when they differ (None otherwise); ``self.generation`` the block of
            :func:`make_generation_block` on C_t channels.
        alpha_mgd: weight α, default 2e-5 (mmrazor).
        lambda_mgd: masked fraction λ, default 0.65 (mmrazor).
        seed: seeds ``self.generator`` (a CPU ``torch.Generator``) for the masks; None
            (default) draws them from the global generator, as mmrazor. Its state is saved
            in the state dict (``_extra_state``), so a resumed run draws the masks it would
            have drawn.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"``.
        backend: as in :func:`kdfast.functional.mgd_loss`.

    Train the parameters with the student: ``torch.optim.SGD([*student.parameters(),
    *mgd.parameters()], ...)``. ``alpha_mgd``, ``lambda_mgd``, ``reduction`` and ``backend``
    are attributes, checked on assignment.

    Example:
        >>> mgd = kdfast.MGDLoss(student_channels=64, teacher_channels=128, seed=0)
        >>> loss = mgd(student_features, teacher_features.detach())  # doctest: +SKIP
    """

    def __init__(self, student_channels: int, teacher_channels: int, *,
                 alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65, seed: int | None = None,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__()
        for name, value in (("student_channels", student_channels),
                            ("teacher_channels", teacher_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self._set_options(alpha_mgd=alpha_mgd, lambda_mgd=lambda_mgd, reduction=reduction,
                          backend=backend)
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else None)
        self.generation = make_generation_block(teacher_channels)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _check_options(self, options: dict) -> None:
        _checks.check_backend(options.get("backend"))
        check_mgd_options(**{k: v for k, v in options.items() if k != "backend"})

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return mgd_loss(student, teacher, self.generation, align=self.align,
                        generator=self.generator, **self._option_values())

    def get_extra_state(self) -> dict:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        saved = state.get("generator") if isinstance(state, dict) else None
        if saved is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(saved)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self._option_values().items())

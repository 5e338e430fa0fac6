"""Factor transfer: ``ft_loss``, ``FTLoss``, the ``Paraphraser`` and ``Translator`` modules and
the paraphraser's reconstruction loss (Kim, Park & Kwak, "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018).

The method has two stages: the paraphraser (an autoencoder on a teacher feature map) is first
trained alone to reconstruct the teacher's map (:func:`paraphraser_reconstruction_loss`, a
loop in :func:`kdfast.recipes.pretrain_paraphraser`); then the student's translator is trained
with the student so that its factor matches the frozen paraphraser's factor of the teacher
(:func:`ft_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.ft import CORE
from kdfast.reference.ft import FT_MODES

FACTOR_NDIMS = 4


def check_ft_options(mode: str = "repdistiller", power: float = 2.0, pool: bool = True,
                     reduction: str = "mean") -> None:
    _checks.check_choice("mode", mode, FT_MODES)
    _checks.check_positive("power", power)
    _checks.check_flag("pool", pool)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, *,
            mode: str = "repdistiller", power: float = 2.0, pool: bool = True,
            reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""Factor-transfer loss (Kim et al., 2018) between the translator's and the
    paraphraser's factors.

    Default, ``mode="repdistiller"`` (RepDistiller's ``FactorTransfer(p1=2, p2=1)``): each
    (B, C, H, W) factor becomes the unit vector φ(F) = normalise(mean_c F^power) over the
    H·W positions (an attention map of the factor; the channel counts may differ), and

    .. math::
        \ell_b = \frac{1}{HW}\sum_{h,w}\big|\varphi(F_s)_{b,hw} - \varphi(F_t)_{b,hw}\big|

    ``mode="paper"`` (the paper's L1 of the normalised factors, as torchdistill's
    ``FTLoss(p=1)``): φ(F) = F flattened to C·H·W and normalised (the channel counts must
    match), ℓ_b the mean of |φ(F_s) − φ(F_t)| over the C·H·W entries (the paper writes the
    sum; the mean only rescales). ``power`` applies to ``"repdistiller"`` only.
    ``reduction="mean"`` is the libraries' global mean. Norms are max(‖·‖, 1e-12): an
    all-zero factor gives 0, not NaN (torchdistill divides by the plain norm).

    Args:
        student_factor: (B, C_s, H_s, W_s) the translator's output on the student features.
        teacher_factor: (B, C_t, H_t, W_t) the paraphraser's factor of the teacher features.
        mode: ``"repdistiller"`` (default) or ``"paper"``.
        power: the exponent of the channel mean, > 0, default 2 (RepDistiller's ``p1``); a
            non-integer power of a negative entry is NaN, as in ``torch.pow``.
        pool: average-pool the larger factor to the smaller one's size (default True;
            RepDistiller pools adaptively, here the sizes must be whole multiples).
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> paraphraser, translator = kdfast.Paraphraser(64), kdfast.Translator(32, 64)
        >>> f_s, f_t = torch.randn(8, 32, 8, 8), torch.randn(8, 64, 8, 8)
        >>> factor_t = paraphraser.encode(f_t).detach()
        >>> kdfast.functional.ft_loss(translator(f_s), factor_t)  # doctest: +SKIP
    """
    check_ft_options(mode, power, pool, reduction)
    _checks.check_tensor("student_factor", student_factor, FACTOR_NDIMS, "(B, C, H, W)")
    _checks.check_tensor("teacher_factor", teacher_factor, FACTOR_NDIMS, "(B, C, H, W)")
    names = ("student_factor", "teacher_factor")
    _checks.check_same_batch(student_factor, teacher_factor, names)
    student_factor, teacher_factor = _checks.match_spatial(student_factor, teacher_factor,
                                                           pool, names)
    if mode == "paper":
        _checks.check_same_shape(student_factor, teacher_factor, names, (
            "mode='paper' compares the whole factors: build the translator with the "
            "paraphraser's factor channels, or use mode='repdistiller'"))
    student_factor, teacher_factor = _checks.promote(student_factor, teacher_factor)
    core = backends.choose(CORE, backend, student_factor, teacher_factor).fn
    return _checks.reduce(core(student_factor, teacher_factor, mode, float(power)), reduction)


class FTLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.ft_loss`;
    ``forward(student_factor, teacher_factor)``.

    Example:
        >>> kdfast.FTLoss()(torch.randn(8, 32, 8, 8), torch.randn(8, 32, 8, 8))  # doctest: +SKIP
    """

    function = staticmethod(ft_loss)
    validate = staticmethod(check_ft_options)

    def __init__(self, mode: str = "repdistiller", power: float = 2.0, pool: bool = True,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(mode=mode, power=power, pool=pool, reduction=reduction,
                         backend=backend)


def _factor_channels(channels: int, rate) -> int:
    rate = _checks.check_positive("rate", rate)
    factor = int(channels * rate)
    if factor < 1:
        raise ValueError(f"rate={rate} leaves no factor channel of {channels}; use a larger "
                         "rate")
    return factor


def _conv_stage(conv: type, in_channels: int, out_channels: int, batch_norm: bool) -> list:
    """3x3 conv (stride 1, padding 1: the size is kept), BatchNorm (an identity without
    ``batch_norm``, so that the layer indices, and the state-dict keys, are RepDistiller's
    either way), LeakyReLU(0.1)."""
    norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
    return [conv(in_channels, out_channels, 3, 1, 1), norm, nn.LeakyReLU(0.1)]


def _encoder(channels: int, factor: int, batch_norm: bool) -> nn.Sequential:
    """C -> C -> factor -> factor with 3x3 convs: the encoder of both modules."""
    return nn.Sequential(*_conv_stage(nn.Conv2d, channels, channels, batch_norm),
                         *_conv_stage(nn.Conv2d, channels, factor, batch_norm),
                         *_conv_stage(nn.Conv2d, factor, factor, batch_norm))


class Paraphraser(nn.Module):
    """FT's paraphraser: an autoencoder on a teacher feature map (RepDistiller's layout).

    Encoder: three 3x3 convs C_t → C_t → k·C_t → k·C_t, decoder: three 3x3 transposed convs
    back to C_t; each followed by BatchNorm (if ``batch_norm``) and LeakyReLU(0.1). The size
    is kept throughout. ``forward(x)`` returns ``(factor, reconstruction)``, ``encode(x)`` the
    factor only. The state-dict keys are those of RepDistiller's ``Paraphraser``.

    Args:
        channels: C_t of the teacher's (B, C_t, H, W) map.
        rate: k, the factor's channels as a fraction of C_t, default 0.5.
        batch_norm: default False (RepDistiller's ``Paraphraser``).

    Example:
        >>> factor, rec = kdfast.Paraphraser(64)(torch.randn(2, 64, 8, 8))
        >>> factor.shape, rec.shape
        (torch.Size([2, 32, 8, 8]), torch.Size([2, 64, 8, 8]))
    """

    def __init__(self, channels: int, rate: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        channels = _checks.check_int("channels", channels)
        _checks.check_flag("batch_norm", batch_norm)
        factor = _factor_channels(channels, rate)
        self.encoder = _encoder(channels, factor, batch_norm)
        self.decoder = nn.Sequential(
            *_conv_stage(nn.ConvTranspose2d, factor, factor, batch_norm),
            *_conv_stage(nn.ConvTranspose2d, factor, channels, batch_norm),
            *_conv_stage(nn.ConvTranspose2d, channels, channels, batch_norm))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """The factor of (B, C_t, H, W) teacher features, (B, k·C_t, H, W)."""
        return self.encoder(features)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(features)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's translator: maps the student's features to a factor of the paraphraser's width.

    Three 3x3 convs C_s → C_s → k·C_t → k·C_t, each followed by BatchNorm (if
    ``batch_norm``) and LeakyReLU(0.1) (RepDistiller's ``Translator``, with its state-dict
    keys). Trained with the student.

    Args:
        student_channels: C_s. teacher_channels: C_t (of the paraphraser's input).
        rate: k, as the paraphraser's, default 0.5. batch_norm: default True.

    Example:
        >>> kdfast.Translator(32, 64)(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = 0.5,
                 batch_norm: bool = True) -> None:
        super().__init__()
        student_channels = _checks.check_int("student_channels", student_channels)
        teacher_channels = _checks.check_int("teacher_channels", teacher_channels)
        _checks.check_flag("batch_norm", batch_norm)
        self.encoder = _encoder(student_channels, _factor_channels(teacher_channels, rate),
                                batch_norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)


def paraphraser_reconstruction_loss(paraphraser: nn.Module, teacher: torch.Tensor
                                    ) -> torch.Tensor:
    """The paraphraser's pre-training objective: MSE between its reconstruction of the
    (detached) teacher map and the map, as RepDistiller's ``nn.MSELoss()`` init stage.

    Example:
        >>> p = kdfast.Paraphraser(16)
        >>> kdfast.functional.paraphraser_reconstruction_loss(p, torch.randn(2, 16, 4, 4))
        ... # doctest: +SKIP
    """
    _checks.check_features("teacher", teacher)
    teacher = teacher.detach()
    _, reconstruction = paraphraser(teacher)
    return F.mse_loss(reconstruction, teacher)

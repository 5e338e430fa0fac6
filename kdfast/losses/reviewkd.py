"""Knowledge review: ``hcl_loss``, the fusion modules ``AttentionBasedFusion`` and
``ReviewKD``, and ``ReviewKDLoss`` (Chen et al., "Distilling Knowledge via Knowledge
Review", CVPR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.reviewkd import CORE
from kdfast.reference.reviewkd import PYRAMID_LEVELS


def check_hcl_options(levels: Sequence[int] = PYRAMID_LEVELS, reduction: str = "mean"
                      ) -> None:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a tuple of pooled sizes such as (4, 2, 1), got "
                        f"{type(levels).__name__}")
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"levels[{i}] must be an int, got {level!r}")
        if level < 1:
            raise ValueError(f"levels[{i}] must be an int >= 1, got {level}")
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def _check_stages(name: str, feats) -> list[torch.Tensor]:
    if isinstance(feats, torch.Tensor) or not isinstance(feats, Sequence):
        raise TypeError(f"{name} must be a list of (B, C, H, W) feature maps, one per stage, "
                        f"got {type(feats).__name__}")
    if len(feats) == 0:
        raise ValueError(f"{name} is an empty list; pass one feature map per stage")
    return [_checks.check_features(f"{name}[{i}]", x) for i, x in enumerate(feats)]


def hcl_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor], *,
             levels: Sequence[int] = PYRAMID_LEVELS, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""ReviewKD's hierarchical context loss (Chen et al., 2021), summed over stages.

    .. math::
        \ell_b = \sum_{\text{stages}} \frac{\mathrm{mse}(s, t)
            + \sum_{k} 2^{-k}\,\mathrm{mse}(P_{l_k}(s), P_{l_k}(t))}{1 + \sum_k 2^{-k}}

    with :math:`P_l` the adaptive average pool to l x l over the ``levels`` smaller than the
    map's height (k = 1, 2, ... counting only those), mse the mean over (C, H, W) of one
    sample. Defaults as in the authors' ``hcl``: levels (4, 2, 1), so weights 1, 1/2, 1/4,
    1/8 and a divisor of 1.875 for maps larger than 4. ``reduction="mean"`` gives their value;
    their CIFAR-100 script weights it by 0.6 to 8.0 depending on the pair, times the warm-up
    ``min(1, epoch / 20)``, and compares with the teacher's pre-activation features — weight
    it yourself (e.g. in a :class:`kdfast.Term`).

    Args:
        student_feats: list of (B, C, H, W) student maps, one per stage (usually the output
            of :class:`kdfast.ReviewKD`).
        teacher_feats: list of the teacher's maps, each of the same shape as its student map.
        levels: pooled sizes of the pyramid, default (4, 2, 1).
        reduction: ``"mean"`` (default) | ``"sum"`` over the batch, ``"none"`` for (B,).
        backend: ``None``/``"auto"``/``"reference"`` (no fused core).

    Example:
        >>> s = [torch.randn(8, 16, 32, 32), torch.randn(8, 32, 16, 16)]
        >>> t = [torch.randn(8, 16, 32, 32), torch.randn(8, 32, 16, 16)]
        >>> kdfast.functional.hcl_loss(s, t)  # doctest: +SKIP
    """
    check_hcl_options(levels, reduction)
    students = _check_stages("student_feats", student_feats)
    teachers = _check_stages("teacher_feats", teacher_feats)
    if len(students) != len(teachers):
        raise ValueError(f"student_feats has {len(students)} stages but teacher_feats has "
                         f"{len(teachers)}; pass one teacher map per student map")
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        _checks.check_same_batch(students[0], s, ("student_feats[0]", f"student_feats[{i}]"))
        _checks.check_same_shape(s, t, (f"student_feats[{i}]", f"teacher_feats[{i}]"),
                                 "map the student to the teacher's stages with "
                                 "kdfast.ReviewKD(in_channels, out_channels, ...)")
    maps = _checks.promote(*students, *teachers)
    students, teachers = list(maps[:len(students)]), list(maps[len(students):])
    core = backends.choose(CORE, backend, *maps).fn
    return _checks.reduce(core(students, teachers, tuple(levels)), reduction)


def _size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return tuple(value)


class AttentionBasedFusion(nn.Module):
    """ReviewKD's ABF: a student stage, fused with the review of the deeper stages.

    ``forward(x, residual=None, out_size=None)`` returns ``(output, fused)``:
    ``fused`` = conv1x1+BN(x) (mid channels), mixed with ``residual`` (the deeper stage's
    ``fused``, nearest-upsampled to x's size) by two per-position sigmoid attention maps
    from a 1x1 conv of both, then nearest-resized to ``out_size`` if given and different;
    ``output`` = conv3x3+BN(fused) (out channels), compared with the teacher's stage.
    The deepest stage has ``fuse=False`` (no residual, no attention conv).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1,
                                              bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                          if fuse else None)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the authors initialise
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.reduce(x)
        if self.attention is not None:
            if residual is None:
                raise ValueError("this fusion stage needs the residual of the deeper stage")
            residual = F.interpolate(residual, size=fused.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([fused, residual], dim=1))
            fused = fused * weights[:, :1] + residual * weights[:, 1:]
        size = _size(out_size)
        if size is not None and tuple(fused.shape[-2:]) != size:
            fused = F.interpolate(fused, size=size, mode="nearest")
        return self.output(fused), fused


def _channel_list(name: str, value) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty list of channel counts, one per stage, "
                        f"got {value!r}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in value):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return list(value)


class ReviewKD(nn.Module):
    """The review path of ReviewKD: student stages (shallow to deep) -> maps for the teacher's.

    The deepest stage goes through its :class:`AttentionBasedFusion` alone; each shallower
    stage is fused with the residual of the stage below it. ``forward(student_feats)`` takes
    the list of (B, C_i, H_i, W_i) student maps, shallow to deep, and returns the list of
    (B, out_channels[i], ...) maps in the same order, for :func:`hcl_loss` with the teacher's.

    Args:
        in_channels: student channels per stage, shallow to deep.
        out_channels: teacher channels per stage, shallow to deep.
        mid_channel: channels of the fused maps; default ``min(512, in_channels[-1])``, the
            authors' CIFAR-100 value (their ImageNet model takes it as an argument).
        out_shapes: per stage, the teacher's spatial size (int or (H, W)) where it differs
            from the student's, else None (default: the student's sizes). Shallow to deep —
            the authors list ``shapes``/``out_shapes`` deep to shallow; their ``shapes``
            (the student's sizes) are read from the inputs here.

    Example:
        >>> review = kdfast.ReviewKD([16, 32, 64], [32, 64, 128])
        >>> s = [torch.randn(2, 16, 32, 32), torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)]
        >>> [x.shape[1] for x in review(s)]
        [32, 64, 128]
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int],
                 mid_channel: int | None = None, out_shapes: Sequence | None = None) -> None:
        super().__init__()
        in_channels = _channel_list("in_channels", in_channels)
        out_channels = _channel_list("out_channels", out_channels)
        if len(out_channels) != len(in_channels):
            raise ValueError(f"in_channels has {len(in_channels)} stages but out_channels has "
                             f"{len(out_channels)}")
        if out_shapes is not None and len(out_shapes) != len(in_channels):
            raise ValueError(f"out_shapes must have one entry per stage ({len(in_channels)}), "
                             f"got {len(out_shapes)}")
        if mid_channel is None:
            mid_channel = min(512, in_channels[-1])
        _channel_list("mid_channel", [mid_channel])
        last = len(in_channels) - 1
        self.fusions = nn.ModuleList(
            AttentionBasedFusion(c_in, mid_channel, c_out, fuse=i < last)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels, strict=True)))
        self.out_shapes = None if out_shapes is None else [_size(s) for s in out_shapes]

    def forward(self, student_feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feats = _check_stages("student_feats", student_feats)
        if len(feats) != len(self.fusions):
            raise ValueError(f"student_feats has {len(feats)} stages but this ReviewKD was "
                             f"built for {len(self.fusions)}")
        sizes = self.out_shapes or [None] * len(feats)
        outputs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(feats))):
            out, residual = self.fusions[i](feats[i], residual, sizes[i])
            outputs.insert(0, out)
        return outputs


class ReviewKDLoss(FunctionalLoss):
    """ReviewKD: the review path (:class:`ReviewKD`) and :func:`kdfast.functional.hcl_loss`.

    ``forward(student_feats, teacher_feats)`` = ``hcl_loss(self.review(student_feats),
    teacher_feats, levels=..., reduction=...)``. Without ``in_channels`` (default) there is
    no review path and the student's maps are compared as they are (the function's module).

    Args:
        in_channels, out_channels, mid_channel, out_shapes: as in :class:`ReviewKD`.
        levels: default (4, 2, 1). reduction: default ``"mean"``. backend: default None.

    Train ``loss.parameters()`` (the fusion modules) with the student.

    Example:
        >>> loss = kdfast.ReviewKDLoss([16, 32], [32, 64])
        >>> s = [torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
        >>> t = [torch.randn(2, 32, 16, 16), torch.randn(2, 64, 8, 8)]
        >>> loss(s, t)  # doctest: +SKIP
    """

    function = staticmethod(hcl_loss)
    validate = staticmethod(check_hcl_options)

    def __init__(self, in_channels: Sequence[int] | None = None,
                 out_channels: Sequence[int] | None = None, mid_channel: int | None = None,
                 out_shapes: Sequence | None = None, *, levels: Sequence[int] = PYRAMID_LEVELS,
                 reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__(levels=levels, reduction=reduction, backend=backend)
        if (in_channels is None) != (out_channels is None):
            raise ValueError("pass both in_channels and out_channels (to build the review "
                             "path) or neither")
        self.review = (None if in_channels is None
                       else ReviewKD(in_channels, out_channels, mid_channel, out_shapes))

    def forward(self, student_feats, teacher_feats) -> torch.Tensor:
        if self.review is not None:
            student_feats = self.review(student_feats)
        return hcl_loss(student_feats, teacher_feats, **self._option_values())

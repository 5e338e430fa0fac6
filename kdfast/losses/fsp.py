"""Flow-of-solution-procedure distillation: ``fsp_loss`` and ``FSPLoss`` (Yim et al., "A Gift
from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning",
CVPR 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdfast import _checks, backends
from kdfast.losses._module import FunctionalLoss
from kdfast.ops.gram import FSP

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def check_fsp_options(pool: bool = True, reduction: str = "mean") -> None:
    _checks.check_flag("pool", pool)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def _check_pairs(name: str, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(pairs, torch.Tensor) or not isinstance(pairs, Sequence):
        raise TypeError(f"{name} must be a list of (a, b) feature pairs, e.g. "
                        f"list(zip(features, features[1:])), got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError(f"{name} is empty; pass at least one (a, b) pair of feature maps")
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, torch.Tensor) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{name}[{i}] must be a pair (a, b) of (B, C, H, W) tensors, got "
                            f"{type(pair).__name__}")
        a = _checks.check_features(f"{name}[{i}][0]", pair[0])
        b = _checks.check_features(f"{name}[{i}][1]", pair[1])
        checked.append((a, b))
    return checked


def _promoted_pairs(student_pairs, teacher_pairs):
    """Every map of both lists in their one promoted dtype (the dtype rule, _checks.promote)."""
    maps = _checks.promote(*(x for pair in (*student_pairs, *teacher_pairs) for x in pair))
    pairs = list(zip(maps[0::2], maps[1::2], strict=True))
    return pairs[:len(student_pairs)], pairs[len(student_pairs):]


def _matched_pair(name: str, i: int, a: torch.Tensor, b: torch.Tensor, pool: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    names = (f"{name}[{i}][0]", f"{name}[{i}][1]")
    _checks.check_same_batch(a, b, names)
    return _checks.match_spatial(a, b, pool, names)


def _distinct(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, each repeat of an earlier one replaced by a view of it: the fused cores are
    autograd Functions, which torch.compile cannot trace when one tensor fills two inputs
    (``[(s, s)]``). A view costs no copy, and autograd still sums both gradients into ``s``."""
    distinct: list[torch.Tensor] = []
    for tensor in tensors:
        if any(tensor is earlier for earlier in distinct):
            tensor = tensor.view_as(tensor)
        distinct.append(tensor)
    return distinct


def fsp_loss(student_pairs: Pairs, teacher_pairs: Pairs, *, pool: bool = True,
             reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    r"""FSP loss (Yim et al., 2017) over pairs of layers.

    .. math::
        G(a, b) = \frac{X_a X_b^\top}{HW} \in \mathbb{R}^{C_a\times C_b},\qquad
        \ell_b = \sum_{\text{pairs}} \frac{1}{C_a C_b}\lVert G_s - G_t\rVert_F^2

    per sample, X the (C, H·W) view of a map; ``reduction="mean"`` (default) gives, per pair,
    the mean over B·C_a·C_b (RepDistiller), summed over pairs. Computed by one batched GEMM
    per matrix (O(B·C_a·C_b) memory, never the B·C_a·C_b·HW broadcast).

    Args:
        student_pairs: list of (a, b) pairs of (B, C, H, W) student maps, e.g. consecutive
            stages ``list(zip(feats, feats[1:]))``. Within a pair H, W may differ (``pool``).
        teacher_pairs: the teacher's pairs, same length; per pair the channels must match the
            student's (C_a and C_b), the spatial sizes need not.
        pool: within a pair, average-pool the larger map to the smaller (default True); with
            False a mismatch raises.
        reduction: ``"mean"`` | ``"sum"`` over the batch, or ``"none"`` for (B,) losses.
        backend: ``None`` (``KDFAST_BACKEND`` or auto), ``"auto"``, ``"native"``,
            ``"triton"`` or ``"reference"`` for the ``"fsp"`` core.

    Example:
        >>> s = [torch.randn(8, 16, 32, 32), torch.randn(8, 32, 16, 16)]
        >>> t = [torch.randn(8, 16, 32, 32), torch.randn(8, 32, 16, 16)]
        >>> kdfast.functional.fsp_loss([(s[0], s[1])], [(t[0], t[1])])  # doctest: +SKIP
    """
    check_fsp_options(pool, reduction)
    student_pairs = _check_pairs("student_pairs", student_pairs)
    teacher_pairs = _check_pairs("teacher_pairs", teacher_pairs)
    if len(student_pairs) != len(teacher_pairs):
        raise ValueError(f"student_pairs has {len(student_pairs)} pairs but teacher_pairs has "
                         f"{len(teacher_pairs)}; pass one teacher pair per student pair")
    student_pairs, teacher_pairs = _promoted_pairs(student_pairs, teacher_pairs)
    total = None
    for i, (s_pair, t_pair) in enumerate(zip(student_pairs, teacher_pairs, strict=True)):
        _checks.check_same_batch(student_pairs[0][0], s_pair[0],
                                 ("student_pairs[0][0]", f"student_pairs[{i}][0]"))
        _checks.check_same_batch(s_pair[0], t_pair[0],
                                 (f"student_pairs[{i}][0]", f"teacher_pairs[{i}][0]"))
        s_a, s_b = _matched_pair("student_pairs", i, *s_pair, pool)
        t_a, t_b = _matched_pair("teacher_pairs", i, *t_pair, pool)
        s_channels, t_channels = (s_a.shape[1], s_b.shape[1]), (t_a.shape[1], t_b.shape[1])
        if s_channels != t_channels:
            raise ValueError(f"pair {i}: student_pairs[{i}] has channels (C_a, C_b) = "
                             f"{s_channels} but teacher_pairs[{i}] has {t_channels}; FSP "
                             "compares C_a x C_b matrices, so pick layers with equal channel "
                             "counts or map the student's maps with a 1x1 conv first")
        inputs = _distinct(s_a, s_b, t_a, t_b)
        pair_loss = backends.choose(FSP, backend, *inputs).fn(*inputs)
        total = pair_loss if total is None else total + pair_loss
    return _checks.reduce(total, reduction)


class FSPLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.fsp_loss`; ``forward(student_pairs,
    teacher_pairs)`` with lists of (a, b) feature-map pairs.

    Args:
        pool: average-pool within a pair (default True). reduction: default ``"mean"``.
        backend: as in :func:`kdfast.functional.fsp_loss`.

    Example:
        >>> a, b = torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8)
        >>> kdfast.FSPLoss()([(a, b)], [(a.clone(), b.clone())])  # doctest: +SKIP
    """

    function = staticmethod(fsp_loss)
    validate = staticmethod(check_fsp_options)

    def __init__(self, pool: bool = True, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(pool=pool, reduction=reduction, backend=backend)

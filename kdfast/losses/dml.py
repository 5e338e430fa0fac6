"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): ``dml_loss`` and
``DMLLoss``. The K-peer training driver ``MutualLearning`` lives in :mod:`kdfast.recipes`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdfast import _checks
from kdfast.losses._module import FunctionalLoss
from kdfast.losses.kd import check_logit_pair, kd_per_sample

DML_MODES = ("synchronous", "sequential")


def check_dml_options(temperature: float = 1.0, reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def _peer_list(peer_logits) -> list[torch.Tensor]:
    if isinstance(peer_logits, torch.Tensor):
        return [peer_logits]
    if not isinstance(peer_logits, (list, tuple)):
        raise TypeError("peer_logits must be a tensor or a list/tuple of tensors, got "
                        f"{type(peer_logits).__name__}")
    if not peer_logits:
        raise ValueError("peer_logits is an empty list; pass at least one peer's logits")
    return list(peer_logits)


def dml_loss(logits: torch.Tensor, peer_logits: torch.Tensor | Sequence[torch.Tensor], *,
             temperature: float = 1.0, reduction: str = "mean",
             backend: str | None = None) -> torch.Tensor:
    r"""Deep mutual learning mimicry loss of one network towards its peers.

    .. math::
        \ell_b = \frac{1}{K}\sum_{k=1}^{K} T^2\,\mathrm{KL}\big(p_k \,\|\, p_\text{self}\big),
        \quad p = \operatorname{softmax}(z / T)

    summed over classes per sample; ``reduction="mean"`` is the batch mean (``"batchmean"``).
    The peers are **detached**: the loss trains ``logits``' network only. With T = 1 (the
    paper's setting, default) the T^2 factor is 1; with one peer this equals
    ``kd_loss(logits, peer.detach(), temperature=T)``. The full DML objective of a peer adds
    its own cross-entropy to the labels (see :class:`MutualLearning`).

    Args:
        logits: (B, num_classes) logits of the network being trained.
        peer_logits: one (B, num_classes) tensor or a list/tuple of K of them (averaged).
        temperature: T > 0, default 1.0.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` / ``"auto"`` / ``"native"`` / ``"triton"`` / ``"reference"`` (the
            policy of :func:`kd_loss`, whose fused core this loss runs once per peer).

    Example:
        >>> z1, z2, z3 = (torch.randn(8, 10) for _ in range(3))
        >>> kdfast.functional.dml_loss(z1, [z2, z3])  # doctest: +SKIP
    """
    check_dml_options(temperature, reduction)
    peers = _peer_list(peer_logits)
    for k, peer in enumerate(peers):
        check_logit_pair(logits, peer, ("logits", f"peer_logits[{k}]"))
    logits, *peers = _checks.promote(logits, *peers)
    per_peer = [kd_per_sample(logits, peer.detach(), float(temperature), backend)
                for peer in peers]
    return _checks.reduce(torch.stack(per_peer).mean(dim=0), reduction)


class DMLLoss(FunctionalLoss):
    """Module form of :func:`kdfast.functional.dml_loss`; ``forward(logits, peer_logits)``.

    Defaults: ``temperature=1.0``, ``reduction="mean"``.

    Example:
        >>> criterion = kdfast.DMLLoss()
        >>> loss = F.cross_entropy(z1, y) + criterion(z1, [z2, z3])  # doctest: +SKIP
    """

    function = staticmethod(dml_loss)
    validate = staticmethod(check_dml_options)

    def __init__(self, temperature: float = 1.0, reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__(temperature=temperature, reduction=reduction, backend=backend)

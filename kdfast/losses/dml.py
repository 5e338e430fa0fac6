"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): ``dml_loss``, ``DMLLoss``
and the K-peer training helper ``MutualLearning``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks
from kdfast.losses._module import FunctionalLoss, OptionAttributes
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
        backend: ``None`` / ``"auto"`` / ``"reference"`` (same policy as :func:`kd_loss`).

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


class MutualLearning(OptionAttributes):
    r"""Trains K peer networks together with deep mutual learning, one batch per ``step``.

    Peer k minimises ``criterion(z_k, targets) + mimicry_weight * dml_loss(z_k, others)``
    (the paper: cross-entropy plus the mean KL to the other K-1 peers).

    * ``mode="synchronous"`` (default): one forward of every peer, all K losses from those
      outputs, then every optimizer steps. K forwards per step.
    * ``mode="sequential"`` (the paper's Algorithm 1): peers are updated in order, and peer k
      sees the outputs of peers 0..k-1 *after* their update this step. 3K - 2 forwards per
      step (each updated peer's output is recomputed under ``no_grad`` for the peers after
      it; in training mode that updates batch-norm running statistics again).

    Args:
        models: K >= 2 modules mapping ``inputs`` to (B, num_classes) logits.
        optimizers: one optimizer per model, over that model's parameters.
        temperature: T of :func:`dml_loss`, default 1.0.
        mimicry_weight: weight of the DML term, default 1.0.
        mode: ``"synchronous"`` | ``"sequential"``.
        criterion: supervised loss ``fn(logits, targets) -> scalar``, default
            ``F.cross_entropy``.

    ``temperature``, ``mimicry_weight`` and ``mode`` are attributes, checked on assignment.

    Example:
        >>> nets = [make_net() for _ in range(2)]
        >>> dml = MutualLearning(nets, [torch.optim.SGD(n.parameters(), 0.1) for n in nets])
        >>> for x, y in loader:
        ...     losses = dml.step(x, y)  # doctest: +SKIP
    """

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 *, temperature: float = 1.0, mimicry_weight: float = 1.0,
                 mode: str = "synchronous",
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> None:
        if len(models) < 2:
            raise ValueError(f"models must hold at least 2 peers, got {len(models)}")
        if len(optimizers) != len(models):
            raise ValueError(f"optimizers must hold one optimizer per model: got "
                             f"{len(optimizers)} for {len(models)} models")
        self._set_options(temperature=temperature, mimicry_weight=mimicry_weight, mode=mode)
        self.models, self.optimizers = list(models), list(optimizers)
        self.criterion = criterion or F.cross_entropy

    def _check_options(self, options: dict) -> None:
        check_dml_options(options["temperature"])
        _checks.check_positive("mimicry_weight", options["mimicry_weight"], inclusive=True)
        _checks.check_choice("mode", options["mode"], DML_MODES)

    def peer_loss(self, logits: torch.Tensor, others: Sequence[torch.Tensor],
                  targets: torch.Tensor) -> torch.Tensor:
        """The objective of one peer: criterion + mimicry_weight * DML towards ``others``."""
        mimicry = dml_loss(logits, list(others), temperature=self.temperature)
        return self.criterion(logits, targets) + float(self.mimicry_weight) * mimicry

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """One update of every peer on a batch; returns the K losses (detached scalars)."""
        if self.mode == "synchronous":
            return self._synchronous_step(inputs, targets)
        return self._sequential_step(inputs, targets)

    def _synchronous_step(self, inputs, targets) -> list[torch.Tensor]:
        outputs = [model(inputs) for model in self.models]
        losses = [self.peer_loss(z, outputs[:k] + outputs[k + 1:], targets)
                  for k, z in enumerate(outputs)]
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        # The peers are detached inside dml_loss, so loss k reaches model k's parameters only.
        torch.stack(losses).sum().backward()
        for optimizer in self.optimizers:
            optimizer.step()
        return [loss.detach() for loss in losses]

    def _sequential_step(self, inputs, targets) -> list[torch.Tensor]:
        with torch.no_grad():  # peer 0's old output is never used: peers after it see the new one
            outputs = [None] + [model(inputs) for model in self.models[1:]]
        losses = []
        for k, (model, optimizer) in enumerate(zip(self.models, self.optimizers, strict=True)):
            loss = self.peer_loss(model(inputs), outputs[:k] + outputs[k + 1:], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if k + 1 < len(self.models):
                with torch.no_grad():
                    outputs[k] = model(inputs)
        return losses

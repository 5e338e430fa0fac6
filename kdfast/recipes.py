"""Training recipes: the drivers that own models and optimisers, built on the losses.

* :class:`MutualLearning` — deep mutual learning's K-peer step (Zhang et al., CVPR 2018), on
  :func:`kdfast.functional.dml_loss`.
* :class:`BornAgain`, :class:`BornAgainEnsemble` — born-again generations and their ensemble
  (Furlanello et al., ICML 2018), on :func:`kdfast.functional.ban_generation_loss`.
* :class:`AdversarialKD` — the alternating discriminator/student steps of KD with conditional
  adversarial networks (Xu et al., 2018), on :func:`kdfast.functional.discriminator_loss` and
  :func:`kdfast.functional.adversarial_student_loss`.
* :func:`pretrain_paraphraser` — factor transfer's first stage (Kim et al., NeurIPS 2018): the
  paraphraser trained alone to reconstruct the teacher's features, on
  :func:`kdfast.functional.paraphraser_reconstruction_loss`.

The losses themselves (functions and ``nn.Module`` criteria) live in :mod:`kdfast.losses`;
everything here is re-exported as ``kdfast.<Name>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks
from kdfast._options import OptionAttributes
from kdfast.losses.adversarial import (
    adversarial_student_loss,
    check_adversarial_options,
    discriminator_loss,
)
from kdfast.losses.ban import ban_generation_loss, check_ban_options
from kdfast.losses.dml import DML_MODES, check_dml_options, dml_loss
from kdfast.losses.ft import paraphraser_reconstruction_loss
from kdfast.losses.kd import check_logit_pair

__all__ = ["AdversarialKD", "BornAgain", "BornAgainEnsemble", "MutualLearning",
           "pretrain_paraphraser"]


# --- deep mutual learning --------------------------------------------------------------------

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


# --- born-again networks --------------------------------------------------------------------

def log_mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of softmax(z_k) over k, computed in log space (finite for any z).

    A class masked (−inf) in every generation gets −inf and a gradient of exactly 0: the
    logsumexp runs on 0 there (double where), whose backward over all −inf would be NaN.
    """
    log_probs = torch.stack([F.log_softmax(z, dim=1) for z in logits])
    masked = (log_probs == float("-inf")).all(dim=0)
    log_sum = torch.logsumexp(torch.where(masked, 0.0, log_probs), dim=0)
    log_mean = log_sum - torch.log(torch.tensor(float(len(logits))))
    return torch.where(masked, float("-inf"), log_mean)


class BornAgainEnsemble(nn.Module):
    r"""The BAN ensemble: the average of the generations' class probabilities.

    .. math:: \bar p(x) = \frac1K \sum_{k} \operatorname{softmax}(f_k(x))

    ``forward(inputs)`` returns :math:`\bar p` of shape (B, num_classes) (rows sum to 1), or
    :math:`\log \bar p` with ``log_probs=True`` (computed as a log-sum-exp, ready for
    ``F.nll_loss``). Generations are whatever modules map ``inputs`` to logits; the ensemble
    does not freeze or detach them.

    Args:
        models: the K >= 1 generations (e.g. ``BornAgain.generations``).
        log_probs: return log-probabilities instead of probabilities (default False).

    Example:
        >>> ensemble = kdfast.BornAgainEnsemble([gen1, gen2, gen3])
        >>> predictions = ensemble(x).argmax(dim=1)  # doctest: +SKIP
    """

    def __init__(self, models: Sequence[nn.Module], log_probs: bool = False) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("models is empty; pass at least one generation")
        self.models = nn.ModuleList(models)
        self.log_probs = bool(log_probs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = [model(inputs) for model in self.models]
        for k, z in enumerate(logits):
            check_logit_pair(logits[0], z, ("output of generation 0", f"output of generation {k}"))
        log_mean = log_mean_softmax(logits)
        return log_mean if self.log_probs else log_mean.exp()

    def extra_repr(self) -> str:
        return f"log_probs={self.log_probs}"


class BornAgain(OptionAttributes, nn.Module):
    """Sequence of born-again generations: each new one is taught by the previous, frozen one.

    ``new_generation()`` builds ``make_model()`` and freezes the current last generation
    (``requires_grad_(False)`` and kept in eval mode, even under ``.train()``). ``loss(inputs,
    targets)`` is the objective of the newest generation: the cross-entropy to the labels for
    generation 0 (the teacher trained from scratch), :func:`ban_generation_loss` towards the
    previous generation's outputs (computed under ``no_grad``) after that.

    Args:
        make_model: builds a fresh network (same class count every time); called with no
            argument.
        temperature: T of the generation loss, default 1.0.
        label_weight: weight of the label cross-entropy from generation 1 on, default 0.0
            (the paper's BAN trains on the teacher's outputs only).
            Both are attributes, checked on assignment (e.g. a new T for the next generation).

    Example:
        >>> ban = kdfast.BornAgain(lambda: ResNet18(num_classes=100))
        >>> for k in range(3):
        ...     model = ban.new_generation()
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     for x, y in loader:
        ...         opt.zero_grad(); ban.loss(x, y).backward(); opt.step()
        >>> ensemble = ban.ensemble(start=1)  # doctest: +SKIP
    """

    def __init__(self, make_model: Callable[[], nn.Module], *, temperature: float = 1.0,
                 label_weight: float = 0.0) -> None:
        super().__init__()
        if not callable(make_model):
            raise TypeError(f"make_model must be callable (returning a new nn.Module), got "
                            f"{type(make_model).__name__}")
        self._set_options(temperature=temperature, label_weight=label_weight)
        self.make_model = make_model
        self.generations = nn.ModuleList()

    def _check_options(self, options: dict) -> None:
        check_ban_options(**options)

    @property
    def student(self) -> nn.Module:
        """The newest generation (the one being trained)."""
        if not self.generations:
            raise RuntimeError("no generation yet; call new_generation() first")
        return self.generations[-1]

    @property
    def teacher(self) -> nn.Module | None:
        """The previous generation (frozen), or None while training generation 0."""
        return self.generations[-2] if len(self.generations) >= 2 else None

    def new_generation(self) -> nn.Module:
        """Freezes the newest generation and appends (and returns) a fresh one."""
        if self.generations:
            self.generations[-1].requires_grad_(False).eval()
        model = self.make_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"make_model must return an nn.Module, got {type(model).__name__}")
        self.generations.append(model)
        return model

    def train(self, mode: bool = True) -> BornAgain:
        super().train(mode)
        for frozen in list(self.generations)[:-1]:
            frozen.eval()
        return self

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The newest generation's training loss on a batch (a scalar, batch mean)."""
        logits = self.student(inputs)
        if self.teacher is None:
            _checks.check_logits("student output", logits)
            targets = _checks.check_labels("targets", targets, *logits.shape, logits.device)
            return F.cross_entropy(logits, targets)
        with torch.no_grad():
            previous = self.teacher(inputs)
        return ban_generation_loss(logits, previous, targets, temperature=self.temperature,
                                   label_weight=self.label_weight)

    def ensemble(self, start: int = 0, log_probs: bool = False) -> BornAgainEnsemble:
        """A :class:`BornAgainEnsemble` of generations ``start:`` (1 leaves out the teacher)."""
        return BornAgainEnsemble(list(self.generations)[start:], log_probs=log_probs)


# --- KD with conditional adversarial networks ------------------------------------------------

def check_discriminator_steps(discriminator_steps: int) -> None:
    if isinstance(discriminator_steps, bool) or not isinstance(discriminator_steps, int) \
            or discriminator_steps < 1:
        raise ValueError(f"discriminator_steps must be a positive int, got "
                         f"{discriminator_steps!r}")


class AdversarialKD(OptionAttributes, nn.Module):
    """Alternating steps of KD with a conditional adversarial network.

    Holds the discriminator and its optimizer. ``step(student_logits, teacher_logits,
    labels)`` first runs ``discriminator_steps`` updates of the discriminator on
    :func:`discriminator_loss` (student and teacher detached: no gradient reaches the student),
    then returns :func:`adversarial_student_loss` under the updated discriminator, for the
    caller to add to its objective, backward and step the student's optimizer with.

    Args:
        discriminator: e.g. ``ConditionalDiscriminator(num_classes)``.
        optimizer: the discriminator's optimizer; default
            ``Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))`` (the usual GAN
            setting).
        kind: ``"lsgan"`` (default) | ``"bce"``. l1_weight: default 1.0.
        discriminator_steps: D updates per call, default 1.

    Attributes:
        kind, l1_weight, discriminator_steps: the options, checked on assignment.
        last_discriminator_loss: the (detached) D loss of the last update.

    Example:
        >>> adv = kdfast.AdversarialKD(kdfast.ConditionalDiscriminator(100))
        >>> z_s = student(x)
        >>> with torch.no_grad():
        ...     z_t = teacher(x)
        >>> loss = F.cross_entropy(z_s, y) + adv.step(z_s, z_t, y)
        >>> opt.zero_grad(); loss.backward(); opt.step()  # doctest: +SKIP
    """

    def __init__(self, discriminator: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, kind: str = "lsgan", l1_weight: float = 1.0,
                 discriminator_steps: int = 1) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got "
                            f"{type(discriminator).__name__}")
        self._set_options(kind=kind, l1_weight=l1_weight,
                          discriminator_steps=discriminator_steps)
        self.discriminator = discriminator
        self.optimizer = optimizer or torch.optim.Adam(discriminator.parameters(), lr=2e-4,
                                                       betas=(0.5, 0.999))
        self.last_discriminator_loss: torch.Tensor | None = None

    def _check_options(self, options: dict) -> None:
        check_adversarial_options(options["kind"], options["l1_weight"])
        check_discriminator_steps(options["discriminator_steps"])

    def discriminator_step(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        """One update of the discriminator; returns its loss before the update (detached)."""
        loss = discriminator_loss(self.discriminator, student_logits, teacher_logits, labels,
                                  kind=self.kind)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.last_discriminator_loss = loss.detach()
        return self.last_discriminator_loss

    def student_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        return adversarial_student_loss(self.discriminator, student_logits, teacher_logits,
                                        labels, kind=self.kind, l1_weight=self.l1_weight)

    def step(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """D update(s), then the student's loss (a scalar with a graph to the student)."""
        for _ in range(self.discriminator_steps):
            self.discriminator_step(student_logits, teacher_logits, labels)
        return self.student_loss(student_logits, teacher_logits, labels)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return self.step(student_logits, teacher_logits, labels)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, l1_weight={self.l1_weight}, "
                f"discriminator_steps={self.discriminator_steps}")


# --- factor transfer: the paraphraser's pre-training -----------------------------------------

def pretrain_paraphraser(paraphraser: nn.Module, teacher_batches: Iterable[torch.Tensor],
                         optimizer: torch.optim.Optimizer, epochs: int = 1) -> list[float]:
    """Trains ``paraphraser`` to reconstruct the teacher's feature maps (FT's first stage).

    One optimiser step per batch of ``teacher_batches`` (the (B, C_t, H, W) maps of the
    teacher layer, e.g. computed under ``torch.no_grad``; an iterable re-read each epoch, such
    as a list or a generator function's result per epoch) on
    :func:`kdfast.functional.paraphraser_reconstruction_loss` (MSE, RepDistiller's init
    stage). The paraphraser is put in train mode first and in eval mode at the end, ready to
    give the factors of the second stage. Returns the mean loss of each epoch.

    Example:
        >>> paraphraser = kdfast.Paraphraser(64)
        >>> optimizer = torch.optim.SGD(paraphraser.parameters(), lr=0.01, momentum=0.9)
        >>> kdfast.recipes.pretrain_paraphraser(paraphraser, teacher_maps, optimizer)
        ... # doctest: +SKIP
    """
    epochs = _checks.check_int("epochs", epochs)
    paraphraser.train()
    history = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for teacher in teacher_batches:
            loss = paraphraser_reconstruction_loss(paraphraser, teacher)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        if count == 0:
            raise ValueError("teacher_batches gave no batch; pass a list (or another "
                             "iterable that can be read once per epoch) of teacher maps")
        history.append(total / count)
    paraphraser.eval()
    return history

"""Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar, ICML 2018):
``ban_generation_loss``, the ``BornAgain`` generation helper and ``BornAgainEnsemble``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import _checks
from kdfast.losses._module import OptionAttributes
from kdfast.losses.kd import check_logit_pair, kd_per_sample


def check_ban_options(temperature: float = 1.0, label_weight: float = 0.0,
                      reduction: str = "mean") -> None:
    _checks.check_positive("temperature", temperature)
    _checks.check_positive("label_weight", label_weight, inclusive=True)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)


def ban_generation_loss(student_logits: torch.Tensor, previous_logits: torch.Tensor,
                        targets: torch.Tensor | None = None, *, temperature: float = 1.0,
                        label_weight: float = 0.0, reduction: str = "mean",
                        backend: str | None = None) -> torch.Tensor:
    r"""Loss of born-again generation k, taught by the frozen generation k-1.

    .. math::
        \ell_b = T^2\,\mathrm{KL}\big(p_{k-1} \,\|\, p_k\big)
                 + \lambda\,\mathrm{CE}(z_k, y_b),\quad p = \operatorname{softmax}(z / T)

    The KL term is :func:`kd_loss` with the previous generation's logits detached; it differs
    from the paper's cross-entropy to the teacher's soft targets only by the teacher's entropy,
    a constant (so the gradient is the same and identical outputs give 0). The paper trains
    with the teacher's outputs only (``label_weight=0``, the default); ``label_weight > 0`` adds
    the usual cross-entropy to the labels (then ``targets`` is required; with
    ``label_weight=0`` it is validated but unused).

    Args:
        student_logits: (B, num_classes) logits of generation k.
        previous_logits: (B, num_classes) logits of generation k-1 (detached here).
        targets: optional (B,) integer class indices.
        temperature: T > 0, default 1.0. label_weight: lambda >= 0, default 0.0.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` for (B,) losses.
        backend: ``None`` / ``"auto"`` / ``"reference"`` (the KD core's policy).

    Example:
        >>> z_k, z_prev, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
        >>> F = kdfast.functional
        >>> F.ban_generation_loss(z_k, z_prev, y, label_weight=1.0)  # doctest: +SKIP
    """
    check_ban_options(temperature, label_weight, reduction)
    check_logit_pair(student_logits, previous_logits, ("student_logits", "previous_logits"))
    if targets is None and label_weight > 0:
        raise ValueError(f"label_weight={label_weight} needs targets (the (B,) class indices); "
                         "pass targets or set label_weight=0")
    student_logits, previous_logits = _checks.promote(student_logits, previous_logits)
    per_sample = kd_per_sample(student_logits, previous_logits.detach(), float(temperature),
                               backend)
    if targets is not None:
        batch, num_classes = student_logits.shape
        targets = _checks.check_labels("targets", targets, batch, num_classes,
                                       student_logits.device)
        if label_weight > 0:
            ce = F.cross_entropy(student_logits, targets, reduction="none")
            per_sample = per_sample + float(label_weight) * ce
    return _checks.reduce(per_sample, reduction)


def _log_mean_softmax(logits: Sequence[torch.Tensor]) -> torch.Tensor:
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
        log_mean = _log_mean_softmax(logits)
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

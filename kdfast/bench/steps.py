"""The training-step benchmark (``python -m kdfast.bench --steps``): what one distillation step
of a real teacher/student pair costs with each implementation of its losses.

One step (:func:`training_step`), timed as a whole: the teacher's forward under
``torch.no_grad()`` (teacher in eval mode), the student's forward, the task cross-entropy plus
the loss set's weighted distillation losses, ``backward()``, and an SGD step (momentum 0.9,
weight decay 5e-4; a FitNet connector is trained with the student). ``zero_grad`` runs before
each step, untimed. The pairs and batches are :data:`kdfast.bench.models.SCALES`.

Providers (what computes the distillation losses; the models, the task loss and the optimiser
are the same eager PyTorch in every row):

* ``reference``: every loss with ``backend="reference"``.
* ``native`` (and ``triton`` on CUDA): every loss with that backend where its core has one
  that supports the inputs; the others (FitNet: no fused core) run the reference, and the
  row's note says which.
* ``compile``: the loss set's whole distillation sum on the reference, one function under
  ``torch.compile`` (default mode); the models stay eager. Compilation happens in the warm-up.
* ``naive``: the NST terms in the B·C·C·HW broadcast form public code runs (the ``naive``
  provider of the core benchmark, :func:`kdfast.bench.providers.build`), the other terms on
  the reference; only for the loss sets with an NST term, skipped when it would not fit.

Each scale also gets one ``none`` row: the same step without the distillation losses.

Metrics of a row: the step's median time and the peak memory above what is resident before
the step (models, optimiser state, the batch); the steps of all rows of a scale are timed
round-robin (:func:`kdfast.bench.measure.measure_interleaved`), so that load drift on a
shared machine falls on every row alike;
``loss_median_s``: the distillation losses alone, forward + backward w.r.t. the student's
outputs (:func:`kdfast.bench.measure.measure` in ``full`` mode on copies of the step's
outputs), ``loss_share`` = that time over the step's; ``over_base_s``: the step's median
minus the ``none`` row's (the same share measured by subtraction, noisier: it is the
difference of two noisy medians).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kdfast import backends
from kdfast.bench import providers as prov
from kdfast.bench.cores import CORES
from kdfast.bench.measure import Measurement, Step, classify, measure, measure_interleaved
from kdfast.bench.models import SCALES, Scale
from kdfast.bench.runner import Settings
from kdfast.functional import fitnet_loss
from kdfast.losses.fitnet import make_connector
from kdfast.ops import fitnet as fitnet_op

Outputs = tuple[torch.Tensor, ...]
LossFn = Callable[[Outputs, Outputs], torch.Tensor]

FITNET = "fitnet"
BASELINE = "none"


@dataclass(frozen=True)
class Term:
    """``weight · Σ loss(student[i], teacher[i])`` over the model outputs ``i`` in ``outputs``.
    ``loss``: a core of :data:`kdfast.bench.cores.CORES` (its options, its registry) or
    ``"fitnet"`` (a :func:`kdfast.make_connector` from the student's output to the
    teacher's)."""
    loss: str
    outputs: tuple[int, ...]
    weight: float


@dataclass(frozen=True)
class LossSet:
    name: str
    terms: tuple[Term, ...]

    def outputs(self) -> tuple[int, ...]:
        """The model outputs any term reads, in order."""
        return tuple(sorted({i for term in self.terms for i in term.outputs}))


# Model outputs: cifar (stage1, stage2, stage3, logits), dense (stem, stage, head map).
# Weights as RepDistiller's (AT 1000, NST 50, SP 3000, FitNet 100) and mmrazor's CWD (3).
LOGITS, STAGES, HINT, LAST = 3, (0, 1, 2), (1,), (2,)
DENSE_FEATURES, HEAD = (0, 1), (2,)
KD = Term("kd", (LOGITS,), 1.0)
LOSS_SETS: dict[str, tuple[LossSet, ...]] = {
    "cifar": (LossSet("KD+AT", (KD, Term("at", STAGES, 1000.0))),
              LossSet("KD+NST", (KD, Term("nst-poly", STAGES, 50.0))),
              LossSet("KD+SP", (KD, Term("sp", LAST, 3000.0))),
              LossSet("KD+FitNet", (KD, Term(FITNET, HINT, 100.0)))),
    "dense": (LossSet("NST-poly", (Term("nst-poly", DENSE_FEATURES, 50.0),)),
              LossSet("NST-rbf", (Term("nst-rbf", DENSE_FEATURES, 50.0),)),
              LossSet("AT", (Term("at", DENSE_FEATURES, 1000.0),)),
              LossSet("SP", (Term("sp", DENSE_FEATURES, 3000.0),)),
              LossSet("CWD", (Term("cwd", HEAD, 3.0),))),
}
PROVIDERS = ("reference", "native", "triton", "compile", "naive")


def loss_set_names(scales: Sequence[str]) -> list[str]:
    return [s.name for name in scales for s in LOSS_SETS[SCALES[name].family]]


def step_providers(device: torch.device) -> list[str]:
    return [p for p in PROVIDERS if p != "triton" or device.type == "cuda"]


def registry(term: Term) -> str | None:
    return fitnet_op.CORE if term.loss == FITNET else CORES[term.loss].registry


def _backend_for(term: Term, backend: str, student: torch.Tensor,
                 teacher: torch.Tensor) -> tuple[str, str]:
    """(the backend this term runs, why not ``backend`` or "")."""
    impls = backends.implementations(registry(term)) if registry(term) else {}
    if backend not in impls:
        return "reference", f"{term.loss}: reference (no {backend} core)"
    reason = impls[backend].supports(student, teacher)
    if reason is not None:
        return "reference", f"{term.loss}: reference ({reason})"
    return backend, ""


class DistillLosses(nn.Module):
    """The weighted distillation sum of a loss set, ``forward(students, teachers)`` on the
    outputs :meth:`LossSet.outputs` names (in that order). Holds the FitNet connectors."""

    def __init__(self, loss_set: LossSet, students: Outputs, teachers: Outputs) -> None:
        super().__init__()
        self.loss_set, self.index = loss_set, {i: k for k, i in enumerate(loss_set.outputs())}
        self.connectors = nn.ModuleDict({
            str(i): make_connector(tuple(students[i].shape), tuple(teachers[i].shape))
            for term in loss_set.terms if term.loss == FITNET for i in term.outputs})
        self.calls: dict[tuple[int, int], LossFn] = {}  # (term, output) -> its loss

    def use(self, provider: str, students: Outputs, teachers: Outputs) -> str:
        """Sets every term's loss for ``provider`` (not ``compile``); returns the notes.
        Raises :class:`kdfast.bench.providers.Unavailable` (naive without a naive form)."""
        notes, naive_terms = [], 0
        for t, term in enumerate(self.loss_set.terms):
            for i in term.outputs:
                backend, note = "reference", ""
                if provider == "naive" and term.loss != FITNET and CORES[term.loss].naive:
                    built = prov.build("naive", CORES[term.loss], (students[i],), (teachers[i],))
                    self.calls[t, i] = lambda s, t_, fn=built.fn: fn((s,), (t_,))
                    naive_terms += 1
                    continue
                if provider not in ("reference", "naive"):
                    backend, note = _backend_for(term, provider, students[i], teachers[i])
                self.calls[t, i] = self._call(term, i, backend)
                notes.append(note)
        if provider == "naive" and not naive_terms:
            raise prov.Unavailable("not available", "no loss of the set has a naive form")
        return "; ".join(sorted({n for n in notes if n}))

    def _call(self, term: Term, output: int, backend: str) -> LossFn:
        if term.loss == FITNET:
            connector = self.connectors[str(output)]
            return lambda s, t: fitnet_loss(s, t, connector=connector, backend=backend)
        core = CORES[term.loss]
        return lambda s, t: core.loss((s,), (t,), backend)

    def forward(self, students: Outputs, teachers: Outputs) -> torch.Tensor:
        total = 0.0
        for t, term in enumerate(self.loss_set.terms):
            for i in term.outputs:
                k = self.index[i]
                total = total + term.weight * self.calls[t, i](students[k], teachers[k])
        return total


def pick(outputs: Outputs, positions: Sequence[int]) -> Outputs:
    return tuple(outputs[i] for i in positions)


def training_step(teacher: nn.Module, student: nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                  losses: LossFn | None, positions: Sequence[int]) -> Step:
    """One distillation step (see the module docstring); ``losses`` None: the task loss only."""
    def run(_):
        with torch.no_grad():
            teacher_out = teacher(images)
        student_out = student(images)
        loss = F.cross_entropy(student_out[-1], labels)
        if losses is not None:
            loss = loss + losses(pick(student_out, positions), pick(teacher_out, positions))
        loss.backward()
        optimizer.step()

    return Step(lambda: optimizer.zero_grad(set_to_none=True), run)


def _optimizer(modules: Sequence[nn.Module]) -> torch.optim.SGD:
    params = [p for m in modules for p in m.parameters()]
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


@dataclass
class Pair:
    """The models and batch of one scale, built once; each row trains a fresh student copy."""
    scale: Scale
    teacher: nn.Module
    student: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    teacher_out: Outputs
    student_out: Outputs


def build_pair(scale: Scale, device: torch.device) -> Pair:
    torch.manual_seed(0)
    teacher = scale.teacher().to(device).eval().requires_grad_(False)
    student = scale.student().to(device).train()
    images, labels = scale.inputs(device)
    with torch.no_grad():
        teacher_out, student_out = teacher(images), student(images)
    return Pair(scale, teacher, student, images, labels, teacher_out, student_out)


def _metrics(step: Measurement, loss: Measurement | None) -> dict:
    metrics = step.stats()
    metrics.update(first_call_s=step.first_call_s, peak_bytes=step.peak_bytes,
                   loss_median_s=None, loss_peak_bytes=None)
    if loss is not None and loss.status == "ok":
        metrics.update(loss_median_s=loss.stats()["median_s"], loss_peak_bytes=loss.peak_bytes)
    return metrics


def _row(env: dict, scale: Scale, loss_set: str, provider: str, status: str, note: str,
         metrics: dict | None) -> dict:
    return {**env, "benchmark": "step", "scale": scale.name, "model": scale.description,
            "batch": scale.batch, "loss_set": loss_set, "provider": provider,
            "dtype": "float32", "status": status, "note": note,
            "metrics": metrics or _metrics(Measurement(), None)}


@dataclass
class RowRun:
    """What one row runs: its step and its losses (None for the ``none`` row)."""
    step: Step
    losses: LossFn | None
    students: Outputs
    teachers: Outputs
    compiles: bool
    note: str


def _build_row(pair: Pair, loss_set: LossSet | None, provider: str) -> RowRun:
    """A fresh student copy, its losses for ``provider`` and optimiser; raises Unavailable."""
    student = copy.deepcopy(pair.student)
    modules: list[nn.Module] = [student]
    losses, positions, note = None, (), ""
    if loss_set is not None:
        positions = loss_set.outputs()
        module = DistillLosses(loss_set, pair.student_out, pair.teacher_out).to(pair.images.device)
        note = module.use("reference" if provider == "compile" else provider,
                          pair.student_out, pair.teacher_out)
        modules.append(module)
        losses = torch.compile(module) if provider == "compile" else module
    step = training_step(pair.teacher, student, pair.images, pair.labels, _optimizer(modules),
                         losses, positions)
    leaves = tuple(s.detach().requires_grad_() for s in pick(pair.student_out, positions))
    return RowRun(step, losses, leaves, pick(pair.teacher_out, positions),
                  provider == "compile", note)


def run_scale(scale: Scale, settings: Settings, env: dict, loss_sets: Sequence[str] | None = None,
              progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Rows of one scale: the ``none`` row, then every loss set × provider. The steps of all
    rows are timed round-robin (:func:`kdfast.bench.measure.measure_interleaved`), then the
    losses alone row by row."""
    device = settings.device
    pair = build_pair(scale, device)
    prov.reset_compiled()
    runs, failed = {}, {}
    todo = _todo(scale, settings, loss_sets)
    for k, (loss_set, provider) in enumerate(todo):
        try:
            runs[k] = _build_row(pair, loss_set, provider)
        except prov.Unavailable as why:
            failed[k] = why.status, why.note
        except Exception as error:  # noqa: BLE001 - a failing row is reported, not raised
            failed[k] = classify(error)
    order = sorted(runs)
    measured = dict(zip(order, measure_interleaved(
        [runs[k].step for k in order], device, warmup=settings.warmup, repeats=settings.repeats,
        time_limit=settings.time_limit, compiles=[runs[k].compiles for k in order]),
        strict=True))
    rows = []
    for k, (loss_set, provider) in enumerate(todo):
        name = BASELINE if loss_set is None else loss_set.name
        if k in failed:
            rows.append(_row(env, scale, name, provider, *failed[k], None))
        else:
            rows.append(_measured_row(env, scale, name, provider, runs[k], measured[k],
                                      settings))
        progress(1)
    prov.reset_compiled()
    add_step_derived(rows)
    return rows


def _measured_row(env: dict, scale: Scale, name: str, provider: str, run: RowRun,
                  step: Measurement, settings: Settings) -> dict:
    """The row of a timed step, with its losses timed alone (when the step ran)."""
    note, alone = run.note, None
    if run.losses is not None and step.status == "ok":
        alone = measure(run.losses, run.students, run.teachers, "full", settings.device,
                        warmup=settings.warmup, repeats=settings.repeats,
                        time_limit=settings.time_limit, compiles=run.compiles)
        if alone.status != "ok":
            note = "; ".join(p for p in (note, f"losses alone: {alone.status} {alone.note}")
                             if p)
    status = "compile failed" if run.compiles and step.status == "error" else step.status
    note = "; ".join(p for p in (step.note, note) if p)
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return _row(env, scale, name, provider, status, note, _metrics(step, alone))


def _has_naive(loss_set: LossSet) -> bool:
    return any(t.loss != FITNET and CORES[t.loss].naive for t in loss_set.terms)


def _todo(scale: Scale, settings: Settings,
          loss_sets: Sequence[str] | None) -> list[tuple[LossSet | None, str]]:
    """(loss set, provider) of every row of ``scale``: the ``none`` row first."""
    names = [p for p in step_providers(settings.device)
             if settings.providers is None or p in settings.providers]
    sets = [s for s in LOSS_SETS[scale.family] if loss_sets is None or s.name in loss_sets]
    return [(None, BASELINE)] + [(s, p) for s in sets for p in names
                                 if p != "naive" or _has_naive(s)]


def row_count(scales: Sequence[str], settings: Settings,
              loss_sets: Sequence[str] | None = None) -> int:
    return sum(len(_todo(SCALES[name], settings, loss_sets)) for name in scales)


def add_step_derived(rows: list[dict]) -> None:
    """``loss_share``, ``over_base_s``, ``speedup_vs_reference``, ``speedup_vs_compile`` of
    every row in place (None where a median is missing)."""
    def median(scale, loss_set, provider):
        for row in rows:
            if (row["scale"], row["loss_set"], row["provider"]) == (scale, loss_set, provider) \
                    and row["status"] == "ok":
                return row["metrics"]["median_s"]
        return None

    for row in rows:
        m, key = row["metrics"], (row["scale"], row["loss_set"])
        m.update(loss_share=None, over_base_s=None, speedup_vs_reference=None,
                 speedup_vs_compile=None)
        if row["status"] != "ok" or m["median_s"] is None:
            continue
        base = median(row["scale"], BASELINE, BASELINE)
        if m["loss_median_s"] is not None:
            m["loss_share"] = m["loss_median_s"] / m["median_s"]
        if base is not None and row["loss_set"] != BASELINE:
            m["over_base_s"] = m["median_s"] - base
        for provider, field in (("reference", "speedup_vs_reference"),
                                ("compile", "speedup_vs_compile")):
            other = median(*key, provider)
            if other is not None and row["loss_set"] != BASELINE:
                m[field] = other / m["median_s"]

"""Wiring losses to named layers of a teacher and a student through forward hooks.

    distiller = kdfast.Distiller(student, teacher, [
        kdfast.Term(kdfast.ATLoss(), "layer2", weight=1000.0),
        kdfast.Term(kdfast.KDLoss(temperature=4.0), "fc"),
    ])
    with distiller:                       # hooks registered; removed on exit
        logits, kd_total, terms = distiller(images)
        loss = F.cross_entropy(logits, labels) + kd_total

Layers are dotted paths as ``named_modules()`` gives them (``""`` is the whole model, i.e.
its output). ``capture="output"`` (default) takes the module's output, ``"input"`` its first
positional input — e.g. the input of a ReLU is the pre-activation AB needs; when the module is
an in-place ReLU the input is cloned first, since the ReLU overwrites it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdfast import _checks

CAPTURES = ("output", "input")


@dataclass
class Term:
    """One distillation term: ``weight * loss(student[layer], teacher[teacher_layer])``.

    ``teacher_layer`` defaults to ``student_layer``; ``name`` (the key in the returned dict)
    defaults to ``"<loss class>:<student_layer>"``.
    """

    loss: nn.Module
    student_layer: str
    teacher_layer: str | None = None
    weight: float = 1.0
    capture: str = "output"
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.loss, nn.Module):
            raise TypeError(f"Term.loss must be an nn.Module (e.g. kdfast.ATLoss()), got "
                            f"{type(self.loss).__name__}")
        if self.capture not in CAPTURES:
            raise ValueError(f"Term.capture must be 'output' or 'input'; got {self.capture!r}")
        self.weight = _checks.check_real("Term.weight", self.weight)
        if self.teacher_layer is None:
            self.teacher_layer = self.student_layer
        if self.name is None:
            self.name = f"{type(self.loss).__name__}:{self.student_layer}"


def _in_term(error: Exception, term: Term) -> Exception | None:
    """``error`` rebuilt with its message prefixed by the term and its layers: the same type,
    so ``except ValueError`` still catches it. None (after adding the context as a note where
    Python has notes) for a type that cannot be rebuilt from one message."""
    where = (f"in Term {term.name!r} (student layer {term.student_layer!r}, teacher layer "
             f"{term.teacher_layer!r}, capture={term.capture!r})")
    try:
        return type(error)(f"{where}: {error}")
    except Exception:  # an exception type whose constructor takes other arguments
        if hasattr(error, "add_note"):
            error.add_note(where)
        return None


def _module_at(model: nn.Module, path: str, which: str) -> nn.Module:
    modules = dict(model.named_modules())
    if path not in modules:
        close = [name for name in modules if path.split(".")[-1] in name][:5]
        hint = f"; similar names: {close}" if close else ""
        raise ValueError(f"{which} has no module named {path!r} (use a dotted path from "
                         f"{which}.named_modules()){hint}")
    return modules[path]


def _first_tensor(value, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"{where} produced {type(value).__name__}, not a tensor; hook a module "
                    "whose output (or first input) is a tensor")


class _Recorder:
    """Forward hooks that store one tensor per (model, layer, capture) for the current step."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], torch.Tensor] = {}
        self.handles: list = []

    def hook(self, model: nn.Module, model_name: str, path: str, capture: str) -> None:
        key = (model_name, path, capture)
        module = _module_at(model, path, model_name)
        where = f"{model_name}.{path or '<model>'}"
        if capture == "output":
            def on_output(_module, _inputs, output):
                self.values[key] = _first_tensor(output, where)
            self.handles.append(module.register_forward_hook(on_output))
        else:
            clone = isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)) and module.inplace

            def on_input(_module, inputs):
                value = _first_tensor(inputs, where)
                self.values[key] = value.clone() if clone else value
            self.handles.append(module.register_forward_pre_hook(on_input))

    def take(self, key: tuple[str, str, str]) -> torch.Tensor:
        if key not in self.values:
            raise RuntimeError(f"layer {key[1]!r} of the {key[0]} did not run in this forward "
                               "pass; check the layer name and the model's forward")
        return self.values[key]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.values.clear()


class Distiller(nn.Module):
    """A student, a frozen teacher and weighted distillation terms between their layers.

    ``forward(*inputs)`` runs the teacher (eval mode, no gradients) and the student on the
    same inputs and returns ``(student_output, total, terms)``: the student's own output (for
    the task loss), the weighted sum of the terms, and a dict name -> unweighted term value.

    The loss modules are submodules, so connectors inside them (FitNet, AB) are trainable
    parameters: hand ``distiller.parameters()`` — the student's and the connectors', never the
    teacher's, which is kept outside the module tree — to the optimiser, after
    :meth:`build` if a loss creates its connector from the first shapes it sees.

    Hooks live while the distiller is used as a context manager (or between :meth:`attach`
    and :meth:`detach`); a forward outside raises.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: list[Term],
                 teacher_mode: str = "eval") -> None:
        super().__init__()
        if not terms:
            raise ValueError("terms must hold at least one kdfast.Term")
        if teacher_mode not in ("eval", "train"):
            raise ValueError(f"teacher_mode must be 'eval' or 'train'; got {teacher_mode!r}")
        self.student = student
        # A plain attribute, not a submodule: the teacher's parameters stay out of
        # parameters(), state_dict() and .to() of the distiller.
        object.__setattr__(self, "teacher", teacher)
        self.terms = list(terms)
        self.losses = nn.ModuleList(term.loss for term in self.terms)
        self.teacher_mode = teacher_mode
        names = [term.name for term in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"Term names must be unique, got {names}; pass name=... to tell "
                             "terms on the same layer apart")
        for term in self.terms:  # fail at construction on a bad layer name
            _module_at(student, term.student_layer, "student")
            _module_at(teacher, term.teacher_layer, "teacher")
        self._recorder: _Recorder | None = None

    def attach(self) -> Distiller:
        if self._recorder is not None:
            return self
        recorder = _Recorder()
        for term in self.terms:
            recorder.hook(self.student, "student", term.student_layer, term.capture)
            recorder.hook(self.teacher, "teacher", term.teacher_layer, term.capture)
        self._recorder = recorder
        return self

    def detach(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def __enter__(self) -> Distiller:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _run_teacher(self, inputs, kwargs) -> None:
        was_training = self.teacher.training
        self.teacher.train(self.teacher_mode == "train")
        try:
            with torch.no_grad():
                self.teacher(*inputs, **kwargs)
        finally:
            self.teacher.train(was_training)

    def _capture(self, inputs, kwargs):
        self._recorder.values.clear()
        self._run_teacher(inputs, kwargs)
        return self.student(*inputs, **kwargs)

    def _captured(self, term: Term) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._recorder.take(("student", term.student_layer, term.capture)),
                self._recorder.take(("teacher", term.teacher_layer, term.capture)))

    def forward(self, *inputs, **kwargs):
        if self._recorder is None:
            raise RuntimeError("Distiller hooks are not attached: use `with distiller:` or "
                               "call distiller.attach() before the forward pass")
        output = self._capture(inputs, kwargs)
        terms: dict[str, torch.Tensor] = {}
        total = None
        for term in self.terms:
            student_value, teacher_value = self._captured(term)
            try:
                value = term.loss(student_value, teacher_value)
            except Exception as error:
                wrapped = _in_term(error, term)
                if wrapped is None:
                    raise
                raise wrapped from error
            terms[term.name] = value
            weighted = term.weight * value
            total = weighted if total is None else total + weighted
        self._recorder.values.clear()
        return output, total, terms

    def _parameter_dtype(self) -> torch.dtype:
        floating = (p.dtype for p in self.student.parameters() if p.is_floating_point())
        return next(floating, torch.get_default_dtype())

    @torch.no_grad()
    def build(self, *example_inputs, **kwargs) -> list[str]:
        """Creates connectors from the feature shapes seen on one example batch.

        Every loss with a ``build_connector(student_shape, teacher_shape)`` method (FitNetLoss,
        ABLoss built without channel counts) gets the captured shapes and builds its
        connector where the shapes differ, on the student features' device and in the
        student's parameter dtype. Call it
        before creating the optimiser. Returns the names of the terms that built one.
        """
        attached, was_training = self._recorder is not None, self.training
        self.attach()
        self.eval()  # no batch-norm statistics move on the example batch
        built = []
        try:
            self._capture(example_inputs, kwargs)
            for term in self.terms:
                builder = getattr(term.loss, "build_connector", None)
                if builder is None:
                    continue
                student_value, teacher_value = self._captured(term)
                if builder(student_value.shape, teacher_value.shape):
                    term.loss.to(device=student_value.device, dtype=self._parameter_dtype())
                    built.append(term.name)
        finally:
            self._recorder.values.clear()
            self.train(was_training)
            if not attached:
                self.detach()
        return built

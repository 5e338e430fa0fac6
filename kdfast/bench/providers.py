"""Who computes a core: the providers a benchmark row can name.

* ``reference``: the public loss with ``backend="reference"`` (eager PyTorch).
* ``compile``: that same call under ``torch.compile`` (default mode); on CUDA also
  ``compile-max-autotune`` (``mode="max-autotune-no-cudagraphs"``). Compilation happens in the
  warm-up calls and is not timed; a failure becomes the row's status.
* ``naive``: the B·C·C·HW broadcast formulation of NST/FSP that public KD code runs, where
  :mod:`kdfast.reference` provides it; skipped with a note when it would not fit in memory.
* every other backend registered for the core (``native``, ``triton``, ...): the public loss
  with ``backend=<name>``, where that backend's ``supports(*inputs)`` accepts the inputs. New
  backends therefore appear here without a change to the harness.
* the core's ``peers`` (:mod:`kdfast.bench.peers`: ``liger``, Liger-Kernel's fused linear
  JSD for ``fused-linear-kd``): another library computing the same loss, "not available"
  with the reason where it is not installed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdfast import backends
from kdfast.bench.cores import Core, Tensors, naive_broadcast_bytes

LossFn = Callable[[Tensors, Tensors], torch.Tensor]

BUILTIN = ("reference", "compile", "compile-max-autotune", "naive")


class Unavailable(Exception):
    """A provider that cannot run a core (or these inputs); the message says why."""

    def __init__(self, status: str, note: str = "") -> None:
        super().__init__(note or status)
        self.status, self.note = status, note


@dataclass
class Provider:
    name: str
    fn: LossFn
    compiles: bool = False  # its first call compiles (the time limit starts after it)


def backend_names(core: Core) -> list[str]:
    """The kdfast backends registered for ``core`` other than the reference."""
    if core.registry is None:
        return []
    try:
        impls = backends.implementations(core.registry)
    except KeyError:
        return []
    return [name for name in impls if name != "reference"]


def provider_names(core: Core, device: torch.device) -> list[str]:
    names = ["reference", "compile"]
    if device.type == "cuda":
        names.append("compile-max-autotune")
    if core.naive is not None:
        names.append("naive")
    return names + backend_names(core) + list(core.peers)


_COMPILED: dict[tuple[str, str], LossFn] = {}


def compiled(core: Core, mode: str | None) -> LossFn:
    """One compiled reference per (core, mode), reused across shapes (so that dynamo's
    automatic dynamic shapes spare most recompiles)."""
    key = (core.name, mode or "default")
    if key not in _COMPILED:
        def reference(students: Tensors, teachers: Tensors) -> torch.Tensor:
            return core.loss(students, teachers, "reference")
        _COMPILED[key] = torch.compile(reference, mode=mode)
    return _COMPILED[key]


def reset_compiled() -> None:
    """Forgets the compiled functions and dynamo's caches (between cores and runs)."""
    _COMPILED.clear()
    if "torch._dynamo" in sys.modules:  # importing dynamo only to reset it costs seconds
        torch._dynamo.reset()


def memory_budget(device: torch.device) -> float:
    """Bytes that a provider may use: half of what is free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return 0.5 * int(line.split()[1]) * 1024
    return float("inf")  # pragma: no cover - not Linux


def build(name: str, core: Core, students: Tensors, teachers: Tensors) -> Provider:
    """The provider ``name`` for ``core`` on these inputs, or raises :class:`Unavailable`."""
    need = core.provider_bytes(name, students, teachers) if core.provider_bytes else 0.0
    budget = memory_budget(students[0].device) if need else float("inf")
    if need > budget:
        raise Unavailable("skipped", f"{name} needs ~{need / 2**30:.1f} GiB of logits, "
                                     f"{budget / 2**30:.1f} GiB allowed")
    if name == "reference":
        return Provider(name, lambda s, t: core.loss(s, t, "reference"))
    if name == "compile":
        return Provider(name, compiled(core, None), compiles=True)
    if name == "compile-max-autotune":
        return Provider(name, compiled(core, "max-autotune-no-cudagraphs"), compiles=True)
    if name == "naive":
        return _naive(core, students, teachers)
    if name in core.peers:
        return _peer(name, core, students, teachers)
    return _backend(name, core, students, teachers)


def _peer(name: str, core: Core, students: Tensors, teachers: Tensors) -> Provider:
    module, function = core.peers[name].split(":")
    try:
        fn = getattr(importlib.import_module(module), function)(core, students, teachers)
    except ImportError as error:
        raise Unavailable("not available", f"{name}: {error} (an optional dependency; "
                                           "pip install liger-kernel)") from error
    except ValueError as error:
        raise Unavailable("unsupported", str(error)) from error
    return Provider(name, fn, compiles=True)


def _naive(core: Core, students: Tensors, teachers: Tensors) -> Provider:
    function = core.naive_function()
    if function is None:
        raise Unavailable("not available", f"{core.naive} does not exist" if core.naive
                          else f"no naive formulation of {core.name}")
    need = naive_broadcast_bytes(students, teachers)
    budget = memory_budget(students[0].device)
    if need > budget:
        raise Unavailable("skipped", f"B*C*C*HW broadcast needs ~{need / 2**30:.1f} GiB, "
                                     f"{budget / 2**30:.1f} GiB allowed")
    return Provider("naive", lambda s, t: core.naive_loss(function, s, t))


def _backend(name: str, core: Core, students: Tensors, teachers: Tensors) -> Provider:
    if name not in backend_names(core):
        raise Unavailable("not available", f"no {name} backend registered for {core.name}")
    reason = backends.implementations(core.registry)[name].supports(*students, *teachers)
    if reason is not None:
        raise Unavailable("unsupported", reason)
    return Provider(name, lambda s, t: core.loss(s, t, name))

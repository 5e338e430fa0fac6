"""Timing and peak memory of one benchmark row.

Modes (the student inputs require grad; the teacher does not, as in training):

* ``fwd``: the loss under ``torch.no_grad()``.
* ``bwd``: ``torch.autograd.grad(loss, students)`` only. The forward is re-run before every
  repeat *outside* the timed region (no ``retain_graph``: every backward sees a fresh graph,
  exactly what a training step runs, and frees its saved tensors as it would there).
* ``full``: forward and backward together.

Timing: after ``warmup`` calls, ``repeats`` calls timed one by one, on CPU with
``time.perf_counter``, on CUDA with CUDA events around each call (synchronised after each);
the row reports the median and 20th/80th percentiles. The first warm-up call's time is kept as
``first_call_s`` (it includes ``torch.compile``'s compilation for the compile providers).

Peak memory above the inputs: one extra call after the timed ones. CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before
the call. CPU: the PyTorch profiler with ``profile_memory=True`` records every allocation and
free of PyTorch's CPU allocator during the call; the running sum's maximum is the peak. It sees
transient buffers freed before the call returns (the test suite checks it with a provider that
allocates a known buffer), but not memory taken outside PyTorch's allocator (oneDNN/MKL
scratch, a raw ``malloc`` in an extension). For ``bwd`` the forward runs before the
measurement, so the peak is above the state after the forward.

Time limit: checked after every call (a running ATen call is not interrupted); for the compile
providers it starts after the first call, which compiles. A row that reaches it before one
timed call is done has status ``timeout``; one that reaches it later keeps the repeats done so
far (``samples`` says how many).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kdfast.bench.cores import Tensors

MODES = ("fwd", "bwd", "full")


@dataclass
class Measurement:
    status: str = "ok"
    note: str = ""
    times: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    peak_bytes: int | None = None

    def stats(self) -> dict:
        if not self.times:
            return {"median_s": None, "p20_s": None, "p80_s": None, "samples": 0}
        p20, median, p80 = np.percentile(self.times, [20, 50, 80])
        return {"median_s": float(median), "p20_s": float(p20), "p80_s": float(p80),
                "samples": len(self.times)}


@dataclass
class Step:
    """``prepare()`` runs untimed and its result goes to ``run``, which is timed."""
    prepare: Callable[[], object]
    run: Callable[[object], object]


def make_step(fn: Callable, students: Tensors, teachers: Tensors, mode: str) -> Step:
    def forward(_=None):
        return fn(students, teachers)

    def forward_no_grad(_=None):
        with torch.no_grad():
            return fn(students, teachers)

    def backward(loss):
        return torch.autograd.grad(loss, students)

    def forward_backward(_=None):
        return torch.autograd.grad(fn(students, teachers), students)

    if mode == "fwd":
        return Step(lambda: None, forward_no_grad)
    if mode == "bwd":
        return Step(forward, backward)
    if mode == "full":
        return Step(lambda: None, forward_backward)
    raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")


def time_step(step: Step, device: torch.device) -> float:
    state = step.prepare()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step.run(state)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    step.run(state)
    return time.perf_counter() - begin


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ start/stop lines) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during ``call()`` above its start."""
    # The autograd profiler directly: torch.profiler.profile would import torch._inductor
    # first (seconds on a small machine) for nothing.
    with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True) as prof:
        call()
    events = [e for e in prof.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def peak_bytes(step: Step, device: torch.device) -> int:
    state = step.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step.run(state)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(lambda: step.run(state))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text
                                                or "can't allocate memory" in text)


def classify(error: BaseException) -> tuple[str, str]:
    """(status, note) of a row that raised ``error``."""
    if isinstance(error, NotImplementedError):
        return "not implemented", str(error)
    if is_out_of_memory(error):
        return "oom", str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    first_line = str(error).splitlines()[0] if str(error) else ""
    return "error", f"{type(error).__name__}: {first_line}"[:200]


def measure(fn: Callable, students: Tensors, teachers: Tensors, mode: str, device: torch.device,
            *, warmup: int = 2, repeats: int = 10, time_limit: float = 60.0,
            memory: bool = True, compiles: bool = False) -> Measurement:
    """Times ``fn(students, teachers)`` in ``mode`` and measures its peak memory (see the
    module docstring). Never raises for a failing row: the status says what happened.
    ``compiles``: the first call compiles, so the time limit starts after it."""
    result = Measurement()
    step = make_step(fn, students, teachers, mode)
    deadline = time.perf_counter() + time_limit
    try:
        for i in range(warmup + repeats):
            elapsed = time_step(step, device)
            if i == 0:
                result.first_call_s = elapsed
                if compiles:
                    deadline = time.perf_counter() + time_limit
            if i >= warmup:
                result.times.append(elapsed)
            if time.perf_counter() > deadline and i + 1 < warmup + repeats:
                if not result.times:
                    result.status = "timeout"
                    result.note = f"over the {time_limit:g} s limit before a timed call"
                    return result
                result.note = f"{len(result.times)} of {repeats} repeats in the time limit"
                break
        if memory:
            result.peak_bytes = peak_bytes(step, device)
    except Exception as error:  # noqa: BLE001 - every failure becomes the row's status
        result.status, result.note = classify(error)
        result.times = []
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def measure_interleaved(steps: Sequence[Step], device: torch.device, *, warmup: int = 1,
                        repeats: int = 3, time_limit: float = 60.0,
                        compiles: Sequence[bool] = ()) -> list[Measurement]:
    """:func:`measure` of several steps at once, round-robin: call ``i`` of every step, then
    call ``i + 1`` of every step, so that a change in the machine's load falls on all of them
    alike (the training-step rows are seconds long, and a shared machine's load drifts over
    the minutes a scale takes). Then one peak-memory call each. A step's time limit counts
    the seconds of its own calls, after the first where it ``compiles``."""
    results = [Measurement() for _ in steps]
    spent = [0.0] * len(steps)
    active = list(range(len(steps)))
    for i in range(warmup + repeats):
        for k in list(active):
            result = results[k]
            try:
                elapsed = time_step(steps[k], device)
            except Exception as error:  # noqa: BLE001 - every failure becomes the row's status
                result.status, result.note = classify(error)
                active.remove(k)
                continue
            if i == 0:
                result.first_call_s = elapsed
            if i >= warmup:
                result.times.append(elapsed)
            spent[k] += 0.0 if i == 0 and k < len(compiles) and compiles[k] else elapsed
            if spent[k] > time_limit and i + 1 < warmup + repeats:
                if result.times:
                    result.note = f"{len(result.times)} of {repeats} repeats in the time limit"
                else:
                    result.status = "timeout"
                    result.note = f"over the {time_limit:g} s limit before a timed call"
                active.remove(k)
    for k, result in enumerate(results):
        if result.status != "ok":
            result.times = []
            continue
        try:
            result.peak_bytes = peak_bytes(steps[k], device)
        except Exception as error:  # noqa: BLE001
            result.status, result.note = classify(error)
            result.times = []
    return results

"""The benchmark loop: cores × shapes × providers × modes → rows.

Every row is a dict (the JSON format): the environment fields (device, names, versions,
commit), ``core``, ``shape`` (a dict with its ``kind``), ``shape_label``, ``dtype``,
``provider``, ``mode``, ``status`` (``ok``, ``not implemented``, ``not available``,
``unsupported``, ``skipped``, ``oom``, ``timeout``, ``error``, ``compile failed``), ``note`` and
``metrics``: ``median_s``, ``p20_s``, ``p80_s``, ``samples``, ``first_call_s``, ``peak_bytes``,
``floor_bytes``, ``floor_flops``, ``floor_s``, ``floor_fraction``, ``speedup_vs_reference``,
``speedup_vs_compile`` (None where not measured). A core whose public function still raises
``NotImplementedError`` gives one ``not implemented`` row (shape, provider and mode ``all``).
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from kdfast.bench import providers as prov
from kdfast.bench.ceilings import Ceilings
from kdfast.bench.cores import Core
from kdfast.bench.measure import MODES, Measurement, classify, measure
from kdfast.bench.shapes import SUITES, Shape, shape_dict, shape_from_dict

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype = torch.float32
    modes: Sequence[str] = MODES
    providers: Sequence[str] | None = None  # None: every provider there is ...
    skip_providers: Sequence[str] = ()  # ... but these
    warmup: int = 2
    repeats: int = 10
    time_limit: float = 60.0
    # The measured matmul rate (ceilings): a row whose GEMM floor alone exceeds time_limit is
    # skipped rather than run for one over-long call. None: no such check.
    matmul_flops_per_s: float | None = None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def _cpu_capability() -> str | None:
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get is not None else None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """Where and with what the rows were measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "cpu_name": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        # The widest SIMD ATen uses here ("AVX512", "AVX2", ...): two VMs with one model name
        # can differ in it, and every CPU figure with it.
        "cpu_capability": _cpu_capability(),
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        # Other work on the machine skews CPU timings: the 1-minute load when the run began.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _row(env: dict, core: Core, shape: Shape | None, dtype: torch.dtype, provider: str,
         mode: str, status: str, note: str = "", measurement: Measurement | None = None) -> dict:
    metrics = Measurement().stats() if measurement is None else measurement.stats()
    metrics.update(first_call_s=measurement.first_call_s if measurement else None,
                   peak_bytes=measurement.peak_bytes if measurement else None)
    return {**env, "core": core.name, "shape": shape_dict(shape) if shape else None,
            "shape_label": shape.label if shape else "all",
            "dtype": str(dtype).removeprefix("torch."), "provider": provider, "mode": mode,
            "status": status, "note": note, "metrics": metrics}


def core_status(core: Core, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """("ok", "") when the core's public function runs on a tiny input, else why not."""
    tiny = SUITES["tiny"].shapes(core.kind)[0]
    students, teachers = core.make_inputs(tiny, dtype, device)
    try:
        with torch.no_grad():
            core.loss(students, teachers, "reference")
    except Exception as error:  # noqa: BLE001 - reported as the core's status
        return classify(error)
    return "ok", ""


def selected_providers(core: Core, settings: Settings, extra: dict | None = None) -> list[str]:
    """The provider names that run for ``core``: all there are, or those asked for."""
    names = prov.provider_names(core, settings.device) + list(extra or {})
    return [n for n in names if n not in settings.skip_providers
            and (settings.providers is None or n in settings.providers)]


def run_core(core: Core, shapes: Iterable[Shape], settings: Settings, env: dict,
             extra_providers: dict[str, Callable] | None = None,
             progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Rows of one core. ``extra_providers`` maps a name to ``fn(students, teachers) -> loss``
    (tests add a deliberately wasteful one this way)."""
    device, dtype = settings.device, settings.dtype
    shapes = list(shapes)
    names = selected_providers(core, settings, extra_providers)
    status, note = core_status(core, device, dtype)
    if status != "ok":
        progress(len(shapes) * len(names) * len(settings.modes))
        return [_row(env, core, None, dtype, "all", "all", status, note)]
    rows = []
    prov.reset_compiled()
    for shape in shapes:
        rows += _run_shape(core, shape, names, settings, env, extra_providers or {}, progress)
    prov.reset_compiled()
    return rows


def _run_shape(core, shape, names, settings, env, extra, progress) -> list[dict]:
    device, dtype = settings.device, settings.dtype
    rows = []
    try:
        students, teachers = core.make_inputs(shape, dtype, device)
    except Exception as error:  # noqa: BLE001 - e.g. the inputs alone do not fit
        status, note = classify(error)
        progress(len(names) * len(settings.modes))
        return [_row(env, core, shape, dtype, name, mode, status, note)
                for name in names for mode in settings.modes]
    slow = over_time_limit(core, shape, settings)
    for name in names:
        rows += [_row(env, core, shape, dtype, name, mode, "skipped", slow[mode])
                 for mode in settings.modes if mode in slow]
        progress(len(slow))
        if len(slow) == len(settings.modes):
            continue
        try:
            provider = (prov.Provider(name, extra[name], name.startswith("compile"))
                        if name in extra else prov.build(name, core, students, teachers))
        except prov.Unavailable as why:
            progress(len(settings.modes) - len(slow))
            rows += [_row(env, core, shape, dtype, name, mode, why.status, why.note)
                     for mode in settings.modes if mode not in slow]
            continue
        for mode in (mode for mode in settings.modes if mode not in slow):
            m = measure(provider.fn, students, teachers, mode, device, warmup=settings.warmup,
                        repeats=settings.repeats, time_limit=settings.time_limit,
                        compiles=provider.compiles)
            status = m.status
            if name.startswith("compile") and status == "error":
                status = "compile failed"
            ran = core.code_note(name, students, teachers) if core.code_note else ""
            note = "; ".join(part for part in (m.note, ran) if part)
            rows.append(_row(env, core, shape, dtype, name, mode, status, note, m))
            progress(1)
    return rows


def over_time_limit(core: Core, shape: Shape, settings: Settings) -> dict[str, str]:
    """mode -> why, for the modes whose GEMM floor (a lower bound of one call's time at the
    measured matmul rate) exceeds the time limit: those rows are skipped, not run."""
    if settings.matmul_flops_per_s is None:
        return {}
    itemsize = torch.empty((), dtype=settings.dtype).element_size()
    floors = core.floor(shape, itemsize)
    seconds = {mode: floors[mode].flops / settings.matmul_flops_per_s for mode in settings.modes}
    return {mode: f"one call's GEMM floor is {s:.0f} s at the measured matmul rate, over "
                  f"--time-limit {settings.time_limit:g} s" for mode, s in seconds.items()
            if s > settings.time_limit}


def add_derived(rows: list[dict], cores: dict[str, Core], ceilings: Ceilings | None) -> None:
    """Fills the floor and speed-up metrics of every row in place. The compile baseline is the
    fastest compile variant measured for the same core, shape and mode."""
    def key(row):
        return row["core"], row["shape_label"], row["mode"]

    reference, compiled = {}, {}
    for row in rows:
        median = row["metrics"]["median_s"]
        if row["status"] != "ok" or median is None:
            continue
        if row["provider"] == "reference":
            reference[key(row)] = median
        elif row["provider"].startswith("compile"):
            compiled[key(row)] = min(median, compiled.get(key(row), float("inf")))
    for row in rows:
        metrics = row["metrics"]
        median = metrics["median_s"]
        metrics.update(floor_bytes=None, floor_flops=None, floor_s=None, floor_fraction=None,
                       speedup_vs_reference=None, speedup_vs_compile=None)
        if row["shape"] is None or row["mode"] not in MODES:
            continue
        shape = shape_from_dict(row["shape"])
        itemsize = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
        floor = cores[row["core"]].floor(shape, itemsize)[row["mode"]]
        metrics.update(floor_bytes=floor.bytes, floor_flops=floor.flops)
        if ceilings is not None:
            metrics["floor_s"] = floor.seconds(ceilings.copy_bytes_per_s,
                                               ceilings.matmul_flops_per_s)
        if median is None or row["status"] != "ok":
            continue
        if metrics["floor_s"] is not None:
            metrics["floor_fraction"] = metrics["floor_s"] / median
        if key(row) in reference:
            metrics["speedup_vs_reference"] = reference[key(row)] / median
        if key(row) in compiled:
            metrics["speedup_vs_compile"] = compiled[key(row)] / median

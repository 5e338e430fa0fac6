"""``python -m kdfast.bench``: the command line of the benchmark (see ``--help``)."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import sys
from dataclasses import asdict

import torch

from kdfast.backends import BACKENDS
from kdfast.bench import report
from kdfast.bench.ceilings import measure_ceilings
from kdfast.bench.cores import CORES
from kdfast.bench.measure import MODES
from kdfast.bench.models import SCALES
from kdfast.bench.providers import BUILTIN
from kdfast.bench.runner import (
    DTYPES,
    Settings,
    add_derived,
    environment,
    run_core,
    selected_providers,
)
from kdfast.bench.shapes import CLI_SUITES, SUITES, parse_shape
from kdfast.bench.steps import PROVIDERS as STEP_PROVIDERS
from kdfast.bench.steps import loss_set_names, row_count, run_scale

DEFAULT_OUT = os.path.join("benchmarks", "results")
# Every provider name there can be: the built-in ones, the registry's backends and the
# cores' peers (other libraries).
PROVIDERS = list(BUILTIN) + [b for b in BACKENDS if b not in ("auto", "reference")] + sorted(
    {peer for core in CORES.values() for peer in core.peers})
ALL_LOSS_SETS = list(dict.fromkeys(loss_set_names(list(SCALES))))


def _list(choices=None, what="value"):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if choices is not None and item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdfast.bench",
        description="Time and peak memory of kdfast's cores against eager PyTorch, "
                    "torch.compile and the naive formulations; markdown table on stdout, "
                    "JSON rows and PNG plots on disk.")
    parser.add_argument("--cores", type=_list(list(CORES), "core"), default=None,
                        help=f"comma-separated, default all: {','.join(CORES)}")
    parser.add_argument("--suite", choices=list(SUITES), default=None,
                        help=f"shape suite ({', '.join(CLI_SUITES)}; 'tiny' is for tests), "
                             "default quick")
    parser.add_argument("--shape", action="append", default=None, metavar="SHAPE",
                        help="explicit shape instead of the suite, repeatable: BxCxHxW or "
                             "BxCs/CtxHxW (features), BxCLASSESxHxW (maps), BxCLASSES (logits), "
                             "BxD or BxDs/Dt (embeddings), NxHxV (lmhead: tokens, hidden, "
                             "vocab); each core takes the shapes of its kind")
    parser.add_argument("--providers", type=_list(PROVIDERS, "provider"), default=None,
                        help=f"comma-separated, from {', '.join(PROVIDERS)}; default all that "
                             "can run (the quick suite leaves compile out unless named here)")
    parser.add_argument("--modes", type=_list(MODES, "mode"), default=None,
                        help="comma-separated: fwd, bwd, full (default all)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default cuda when available, else cpu)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per row (10; 3 with --steps)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (2; 1 "
                        "with --steps; these include torch.compile's compilation)")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="seconds per row, checked between calls (default 60)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (torch.set_num_threads; default as is)")
    parser.add_argument("--out", default=None,
                        help=f"directory for the JSON and plots; default {DEFAULT_OUT} with a "
                             "git-ignored local-<host>-<date> name, with --out a "
                             "<device>-<suite> name (what gets committed)")
    parser.add_argument("--name", default=None, help="file stem of the JSON and plot folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    steps = parser.add_argument_group(
        "training steps", "--steps times whole distillation steps of teacher/student pairs "
        "instead of the cores (kdfast/bench/steps.py); --cores, --suite, --shape and --modes "
        "do not apply, --providers takes " + ", ".join(STEP_PROVIDERS))
    steps.add_argument("--steps", action="store_true",
                       help="run the training-step benchmark")
    steps.add_argument("--steps-scale", type=_list(list(SCALES), "scale"), default=None,
                       help="comma-separated, default cifar,dense ('tiny' and 'tiny-dense' are "
                            "for tests)")
    steps.add_argument("--loss-sets", type=_list(ALL_LOSS_SETS, "loss set"), default=None,
                       help="comma-separated, default every set of the chosen scales: "
                            + ", ".join(ALL_LOSS_SETS))
    return parser


CORE_ONLY = ("cores", "suite", "shape", "modes")
STEP_ONLY = ("steps_scale", "loss_sets")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each benchmark's own options, and its defaults where none was given."""
    mode, other = ("--steps", CORE_ONLY) if args.steps else ("the core benchmark", STEP_ONLY)
    given = [_option(dest) for dest in other if getattr(args, dest) is not None]
    if given:
        fix = ("choose with --steps-scale and --loss-sets" if args.steps
               else "add --steps to run the training-step benchmark")
        parser.error(f"{', '.join(given)} does not apply to {mode}; {fix}")
    if args.steps:
        args.steps_scale = args.steps_scale or ["cifar", "dense"]
        unknown = [p for p in args.providers or () if p not in STEP_PROVIDERS]
        if unknown:
            parser.error(f"--providers {', '.join(unknown)}: not a provider of --steps; "
                         f"choose from {', '.join(STEP_PROVIDERS)}")
        sets = loss_set_names(args.steps_scale)
        stray = [s for s in args.loss_sets or () if s not in sets]
        if stray:
            parser.error(f"--loss-sets {', '.join(stray)}: not a loss set of --steps-scale "
                         f"{','.join(args.steps_scale)}; choose from {', '.join(sets)}")
        if args.dtype != "float32":
            parser.error(f"--dtype {args.dtype}: --steps runs float32 models only (no "
                         "autocast); leave --dtype out")
    args.cores = args.cores or list(CORES)
    args.suite = args.suite or "quick"
    args.modes = args.modes or list(MODES)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.steps else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.steps else 2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_mode(parser, args)
    bad_threads = args.threads is not None and args.threads < 1
    if args.repeats < 1 or args.warmup < 0 or args.time_limit <= 0 or bad_threads:
        parser.error("--repeats must be >= 1, --warmup >= 0, --time-limit > 0, --threads >= 1")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    if args.steps:
        return args
    try:
        args.shapes = _shapes(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def _shapes(args) -> dict[str, list]:
    """The shapes each chosen core runs."""
    if not args.shape:
        return {name: list(SUITES[args.suite].shapes(CORES[name].kind)) for name in args.cores}
    shapes = {}
    for name in args.cores:
        parsed = [parse_shape(text, CORES[name].kind) for text in args.shape]
        shapes[name] = [s for s in parsed if s is not None]
        if not shapes[name]:
            raise ValueError(f"--shape: no shape of the {CORES[name].kind} kind for core "
                             f"{name}; add one or leave {name} out of --cores")
    return shapes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_paths(args, env: dict) -> tuple[str, str]:
    """(JSON file, plot directory)."""
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        directory, stem = DEFAULT_OUT, args.name or f"local-{socket.gethostname()}-{stamp}"
    else:
        directory = args.out
        suite = "shapes" if args.shape else args.suite
        if args.steps:
            suite = "steps-" + "-".join(args.steps_scale)
        stem = args.name or f"{_slug(env['device_name'])}-{suite}"
    return os.path.join(directory, stem + ".json"), os.path.join(directory, stem)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps:
        return main_steps(args)
    from tqdm import tqdm

    skip = SUITES[args.suite].skip_by_default if args.providers is None else ()
    settings = Settings(args.device, DTYPES[args.dtype], args.modes, args.providers, skip,
                        args.warmup, args.repeats, args.time_limit)
    if skip:
        print(f"the {args.suite} suite leaves out {', '.join(skip)} unless --providers names "
              "them", file=sys.stderr)
    env = environment(args.device)
    print("measuring the copy bandwidth and matmul rate ...", file=sys.stderr)
    ceilings = measure_ceilings(args.device, settings.dtype)
    settings.matmul_flops_per_s = ceilings.matmul_flops_per_s
    total = sum(len(args.shapes[name]) * len(selected_providers(CORES[name], settings))
                * len(settings.modes) for name in args.cores)
    json_path, plot_dir = output_paths(args, env)
    settings_dict = {k: v for k, v in vars(args).items() if k not in ("device", "shapes")}
    settings_dict.update(device=str(args.device), shapes={k: [asdict(s) for s in v]
                                                          for k, v in args.shapes.items()})
    rows = []
    with tqdm(total=total, file=sys.stderr, unit="row") as bar:
        for name in args.cores:
            bar.set_description(name)
            rows += run_core(CORES[name], args.shapes[name], settings, env, progress=bar.update)
            add_derived(rows, CORES, ceilings)
            # Written after every core, so an interrupted run keeps what it measured.
            report.write_json(json_path, env, ceilings.as_dict(), settings_dict, rows)
    print(report.header(env, ceilings.as_dict(), "explicit" if args.shape else args.suite,
                        args.dtype))
    print()
    print(report.markdown_table(rows))
    return _plotted(args, report.plot, rows, json_path, plot_dir)


def _plotted(args, plot, rows, json_path: str, plot_dir: str) -> int:
    """Draws the plots (unless --no-plots), says what was written, returns the exit code."""
    written = [] if args.no_plots else plot(rows, plot_dir)
    print(f"\nwrote {json_path}" + (f" and {len(written)} plots in {plot_dir}/" if written
                                     else ""), file=sys.stderr)
    return 0


def main_steps(args) -> int:
    """``--steps``: the training-step rows of every chosen scale."""
    from tqdm import tqdm

    settings = Settings(args.device, providers=args.providers, warmup=args.warmup,
                        repeats=args.repeats, time_limit=args.time_limit)
    env = environment(args.device)
    json_path, plot_dir = output_paths(args, env)
    settings_dict = {k: v for k, v in vars(args).items() if k != "device"}
    settings_dict["device"] = str(args.device)
    rows = []
    total = row_count(args.steps_scale, settings, args.loss_sets)
    with tqdm(total=total, file=sys.stderr, unit="row") as bar:
        for name in args.steps_scale:
            bar.set_description(name)
            rows += run_scale(SCALES[name], settings, env, args.loss_sets, progress=bar.update)
            report.write_json(json_path, env, None, settings_dict, rows)
    print(report.header(env, None, "training steps " + ",".join(args.steps_scale), "float32"))
    print()
    print(report.step_table(rows))
    print()
    print(report.step_summary(rows))
    return _plotted(args, report.plot_steps, rows, json_path, plot_dir)

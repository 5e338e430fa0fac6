"""What a run leaves behind: the markdown table, the JSON file and the PNG plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from kdfast.bench.shapes import shape_from_dict

COLUMNS = ("core", "shape", "mode", "provider", "median ms", "p20-p80 ms", "peak MiB",
           "x ref", "x compile", "floor %", "status")


def _g(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "" if value is None else f"{value * scale:.{digits}g}"


def table_row(row: dict) -> list[str]:
    m = row["metrics"]
    spread = "" if m["p20_s"] is None else f"{_g(m['p20_s'], 1e3)}-{_g(m['p80_s'], 1e3)}"
    status = row["status"] + (f" ({row['note']})" if row["note"] else "")
    return [row["core"], row["shape_label"], row["mode"], row["provider"],
            _g(m["median_s"], 1e3), spread, _g(m["peak_bytes"], 2.0 ** -20),
            _g(m.get("speedup_vs_reference"), digits=2), _g(m.get("speedup_vs_compile"), digits=2),
            _g(m.get("floor_fraction"), 100.0, 2), status.replace("|", "/")]


def markdown_table(rows: list[dict]) -> str:
    """One line per row. ``x ref``/``x compile``: the reference's (compile's) median over this
    row's median, so > 1 is faster. ``floor %``: floor time / median time."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    return "\n".join(lines)


def header(env: dict, ceilings: dict | None, suite: str, dtype: str) -> str:
    lines = [f"kdfast benchmark: suite {suite}, {dtype}, {env['device']} ({env['device_name']}, "
             f"{env['cpu_threads']} CPU threads, load {env['load_average']:.1f}), "
             f"torch {env['torch_version']}, "
             f"triton {env['triton_version']}, commit {env['git_commit']}, {env['date']}"]
    if ceilings:
        lines.append(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.3g} GB/s, matmul "
                     f"{ceilings['matmul_flops_per_s'] / 1e9:.3g} GFLOP/s")
    return "\n".join(lines)


def write_json(path: str, env: dict, ceilings: dict | None, settings: dict,
               rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        json.dump({"environment": env, "ceilings": ceilings, "settings": settings,
                   "rows": rows}, out, indent=1)


def _lines_along(rows: list[dict], axis: str) -> tuple[dict, dict]:
    """The rows of the largest group whose shapes differ only along ``axis``, as
    {provider: [(x, row), ...]}, and the fixed fields of that group."""
    groups = defaultdict(list)
    for row in rows:
        shape = shape_from_dict(row["shape"])
        varying = type(shape).axis_fields[axis]
        fixed = tuple((k, v) for k, v in row["shape"].items() if k not in varying)
        groups[fixed].append((shape.axes()[axis], row))
    if not groups:
        return {}, {}
    fixed, members = max(groups.items(), key=lambda item: len({x for x, _ in item[1]}))
    lines = defaultdict(list)
    for x, row in sorted(members, key=lambda member: member[0]):
        lines[row["provider"]].append((x, row))
    return dict(lines), dict(fixed)


def plot(rows: list[dict], directory: str) -> list[str]:
    """PNG per core and mode: time and peak memory against each axis of its shapes, one line
    per provider, log axes. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ok = [r for r in rows if r["status"] == "ok" and r["metrics"]["median_s"] is not None]
    by_panel = defaultdict(list)
    for row in ok:
        by_panel[(row["core"], row["mode"])].append(row)
    os.makedirs(directory, exist_ok=True)
    written = []
    for (core, mode), panel_rows in sorted(by_panel.items()):
        axes_names = list(type(shape_from_dict(panel_rows[0]["shape"])).axis_fields)
        fig, grid = plt.subplots(2, len(axes_names), figsize=(6 * len(axes_names), 8),
                                 squeeze=False)
        for col, axis in enumerate(axes_names):
            lines, fixed = _lines_along(panel_rows, axis)
            for metric_row, (metric, scale, label) in enumerate(
                    (("median_s", 1e3, "median time (ms)"), ("peak_bytes", 2.0 ** -20,
                                                             "peak memory above inputs (MiB)"))):
                ax = grid[metric_row][col]
                for provider, points in sorted(lines.items()):
                    xs = [x for x, r in points if r["metrics"][metric] is not None]
                    ys = [max(r["metrics"][metric] * scale, 1e-6) for x, r in points
                          if r["metrics"][metric] is not None]
                    ax.plot(xs, ys, marker="o", label=provider)
                ax.set_xscale("log")
                ax.set_yscale("log")
                for scale_axis in (ax.xaxis, ax.yaxis):  # 1-2-5 ticks, plain labels (fast)
                    scale_axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                    scale_axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    scale_axis.set_minor_locator(ticker.NullLocator())
                ax.set_xlabel(axis)
                ax.set_ylabel(label)
                fixed_text = ", ".join(f"{k}={v}" for k, v in fixed.items() if k != "kind")
                ax.set_title(f"{core} {mode}: {fixed_text}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if lines:
                    ax.legend(fontsize=8)
        fig.subplots_adjust(left=0.08, right=0.97, bottom=0.07, top=0.95, hspace=0.3,
                            wspace=0.22)
        path = os.path.join(directory, f"{core}-{mode}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


STEP_COLUMNS = ("scale", "loss set", "provider", "step ms", "p20-p80 ms", "peak MiB",
                "losses ms", "share in losses %", "over none ms", "x ref", "x compile", "status")


def step_table_row(row: dict) -> list[str]:
    m = row["metrics"]
    spread = "" if m["p20_s"] is None else f"{_g(m['p20_s'], 1e3)}-{_g(m['p80_s'], 1e3)}"
    status = row["status"] + (f" ({row['note']})" if row["note"] else "")
    return [row["scale"], row["loss_set"], row["provider"], _g(m["median_s"], 1e3), spread,
            _g(m["peak_bytes"], 2.0 ** -20), _g(m["loss_median_s"], 1e3),
            _g(m["loss_share"], 100.0, 2), _g(m["over_base_s"], 1e3),
            _g(m["speedup_vs_reference"], digits=2), _g(m["speedup_vs_compile"], digits=2),
            status.replace("|", "/")]


def step_table(rows: list[dict]) -> str:
    """One line per training-step row (kdfast/bench/steps.py has the definitions)."""
    lines = ["| " + " | ".join(STEP_COLUMNS) + " |", "|" + "---|" * len(STEP_COLUMNS)]
    lines += ["| " + " | ".join(step_table_row(row)) + " |" for row in rows]
    return "\n".join(lines)


def step_summary(rows: list[dict], providers=("reference", "compile", "native")) -> str:
    """"A step with X at this scale goes from A ms / B MiB to C ms / D MiB": one line per
    scale and loss set, one "ms / MiB" column per provider, and native over reference."""
    cells = {(r["scale"], r["loss_set"], r["provider"]): r for r in rows if r["status"] == "ok"}
    keys = list(dict.fromkeys((r["scale"], r["loss_set"]) for r in rows
                              if r["loss_set"] != "none"))
    header = ["scale", "loss set", *(f"{p} ms / MiB" for p in providers), "native x reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale, loss_set in keys:
        row = [scale, loss_set]
        for provider in providers:
            r = cells.get((scale, loss_set, provider))
            m = r["metrics"] if r else None
            row.append("" if m is None else f"{_g(m['median_s'], 1e3)} / "
                                            f"{_g(m['peak_bytes'], 2.0 ** -20)}")
        native = cells.get((scale, loss_set, "native"))
        row.append(_g(native["metrics"]["speedup_vs_reference"], digits=2) if native else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_steps(rows: list[dict], directory: str) -> list[str]:
    """PNG per scale: step time and peak memory per loss set, one bar per provider, the
    step without distillation losses as a dashed line. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["metrics"]["median_s"] is not None]
    os.makedirs(directory, exist_ok=True)
    written = []
    for scale in dict.fromkeys(r["scale"] for r in ok):
        scale_rows = [r for r in ok if r["scale"] == scale]
        sets = list(dict.fromkeys(r["loss_set"] for r in scale_rows if r["loss_set"] != "none"))
        providers = list(dict.fromkeys(r["provider"] for r in scale_rows
                                       if r["loss_set"] != "none"))
        base = next((r for r in scale_rows if r["loss_set"] == "none"), None)
        fig, grid = plt.subplots(1, 2, figsize=(13, 4.5))
        width = 0.8 / max(len(providers), 1)
        for ax, (metric, scale_by, label) in zip(grid, (
                ("median_s", 1e3, "step time, median (ms)"),
                ("peak_bytes", 2.0 ** -20, "peak memory above the resident model (MiB)")),
                strict=True):
            for k, provider in enumerate(providers):
                values = {r["loss_set"]: r["metrics"][metric] for r in scale_rows
                          if r["provider"] == provider and r["metrics"][metric] is not None}
                xs = [i + (k - (len(providers) - 1) / 2) * width
                      for i, name in enumerate(sets) if name in values]
                ax.bar(xs, [values[name] * scale_by for name in sets if name in values],
                       width, label=provider)
            if base is not None and base["metrics"][metric] is not None:
                ax.axhline(base["metrics"][metric] * scale_by, color="k", linestyle="--",
                           linewidth=1, label="no distillation losses")
            ax.set_xticks(range(len(sets)))
            ax.set_xticklabels(sets)
            ax.set_ylabel(label)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"training step, {scale}: {scale_rows[0]['model']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(directory, f"steps-{scale}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written

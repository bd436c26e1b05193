"""Reports over many training runs: collect their ``results.json``, average over seeds, print a table, plot.

A run directory holds one ``results.json`` (written by the trainer). Runs are grouped by
(task, method, k_shot); each group gives the mean and sample standard deviation over its seeds of
the main score and of every metric, so that methods are compared on several seeds rather than on one
lucky run. The plot puts the score against the number of trainable parameters, the trade-off that
parameter-efficient methods are chosen on.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .serialization import _atomic_write

RESULTS_FILE = "results.json"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"

# Each required key of results.json and the types it may take (bool is rejected separately for numbers).
_REQUIRED: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "method": (str,),
    "model": (str,),
    "seed": (int,),
    "k_shot": (int, type(None)),
    "main_metric": (str,),
    "score": (int, float),
    "metrics": (dict,),
    "trainable_params": (int,),
    "wall_time_s": (int, float),
}

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


# --------------------------------------------------------------------------------------------- collect


def collect(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read every ``results.json`` under ``paths`` (run folders, or folders searched recursively).

    A path with no results file, or a results file that is not valid JSON with the expected keys and
    types, is a ``ValueError`` naming it: a report silently missing runs would look complete. A file
    reached through two overlapping paths is read once. Each result gains ``run_dir``, its folder.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("no paths given to collect results from")
    seen: set[Path] = set()
    results: list[dict[str, Any]] = []
    for path in paths:
        for file in _results_files(Path(path)):
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            results.append(_read_result(file))
    return results


def _results_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name != RESULTS_FILE:
            raise ValueError(f"{path} is a file but not a {RESULTS_FILE}")
        return [path]
    if not path.is_dir():
        raise ValueError(f"no {RESULTS_FILE} found: {path} does not exist")
    direct = path / RESULTS_FILE
    if direct.is_file():
        return [direct]
    found = sorted(p for p in path.rglob(RESULTS_FILE) if p.is_file())
    if not found:
        raise ValueError(f"no {RESULTS_FILE} found in {path} (searched recursively)")
    return found


def _read_result(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt results file {file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"corrupt results file {file}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"corrupt results file {file}: missing key(s) {', '.join(missing)}")
    for key, types in _REQUIRED.items():
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"corrupt results file {file}: {key!r} has type {type(value).__name__}, "
                             f"expected {' or '.join(t.__name__ for t in types)}")
    for name, value in data["metrics"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"corrupt results file {file}: metric {name!r} is {value!r}, expected a number")
    data.setdefault("run_dir", str(file.parent))
    return data


# ------------------------------------------------------------------------------------------- aggregate


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the deviation of a single run is 0.0."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _k_order(k: int | None) -> float:
    return math.inf if k is None else float(k)


def aggregate(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, k_shot): seeds, mean and sample std of the score and every metric.

    Rows are plain JSON-able dicts::

        {"task", "method", "k_shot", "model", "main_metric", "n", "seeds",
         "score_mean", "score_std", "metrics": {name: {"mean", "std", "n"}},
         "trainable_params", "wall_time_s_mean", "run_dirs"}

    ``trainable_params`` is the mean over the runs. A metric missing from some runs is averaged over
    the runs that have it (its own ``n`` says how many). A group that mixes base models or main
    metrics, or holds the same seed twice, is a ``ValueError``: averaging those would be meaningless.
    """
    groups: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {}
    for r in results:  # a run's label (dapt+tapt, tapt+unipelt, ...) names its row where it has one
        groups.setdefault((r["task"], r.get("label") or r["method"], r["k_shot"]), []).append(r)
    rows = []
    for (task, method, k), runs in groups.items():
        where = f"task={task!r} method={method!r} k_shot={k!r}"
        for key in ("model", "main_metric"):
            values = sorted({r[key] for r in runs})
            if len(values) > 1:
                raise ValueError(f"runs of {where} mix several {key}s ({', '.join(values)}); report them apart")
        by_seed: dict[int, dict[str, Any]] = {}
        for r in runs:
            if r["seed"] in by_seed:
                raise ValueError(f"seed {r['seed']} appears twice for {where}: "
                                 f"{by_seed[r['seed']].get('run_dir', '?')} and {r.get('run_dir', '?')}")
            by_seed[r["seed"]] = r
        runs = [by_seed[s] for s in sorted(by_seed)]
        score_mean, score_std = _mean_std([r["score"] for r in runs])
        metric_names = sorted({name for r in runs for name in r["metrics"]})
        metrics = {}
        for name in metric_names:
            values = [r["metrics"][name] for r in runs if name in r["metrics"]]
            mean, std = _mean_std(values)
            metrics[name] = {"mean": mean, "std": std, "n": len(values)}
        rows.append({
            "task": task,
            "method": method,
            "k_shot": k,
            "model": runs[0]["model"],
            "main_metric": runs[0]["main_metric"],
            "n": len(runs),
            "seeds": [r["seed"] for r in runs],
            "score_mean": score_mean,
            "score_std": score_std,
            "metrics": metrics,
            "trainable_params": statistics.fmean(r["trainable_params"] for r in runs),
            "wall_time_s_mean": statistics.fmean(float(r["wall_time_s"]) for r in runs),
            "run_dirs": [r.get("run_dir") for r in runs],
        })
    rows.sort(key=lambda row: (row["task"], _k_order(row["k_shot"]), row["method"]))
    return rows


# ---------------------------------------------------------------------------------------------- table


def _k_label(k: int | None) -> str:
    return "full" if k is None else str(k)


def _params_label(p: float) -> str:
    return f"{round(p):,}"


def task_averages(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, k_shot), the mean over tasks of the seed-averaged score (the GLUE-style average).

    ``n_tasks`` says over how many of all the tasks in ``rows`` the method was run; an average over
    fewer tasks than the others is not comparable with theirs, and the table says so.
    """
    all_tasks = sorted({row["task"] for row in rows})
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["k_shot"]), []).append(row)
    out = []
    for (method, k), members in groups.items():
        out.append({
            "method": method,
            "k_shot": k,
            "score_mean": statistics.fmean(m["score_mean"] for m in members),
            "n_tasks": len(members),
            "of_tasks": len(all_tasks),
            "trainable_params": statistics.fmean(m["trainable_params"] for m in members),
        })
    out.sort(key=lambda a: (_k_order(a["k_shot"]), a["method"]))
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: task, k, method, metric, score mean ± std over seeds, seeds, trainable params.

    When the rows span several tasks, one "average over tasks" row per (method, k) follows; its score
    is the mean of the per-task means (no ± : the tasks' seeds need not match).
    """
    header = ["task", "k", "method", "metric", "score", "n", "trainable params"]
    lines: list[list[str]] = []
    for row in rows:
        lines.append([row["task"], _k_label(row["k_shot"]), row["method"], row["main_metric"],
                      f"{row['score_mean']:.4f} ± {row['score_std']:.4f}", str(row["n"]),
                      _params_label(row["trainable_params"])])
    averages = task_averages(rows) if len({row["task"] for row in rows}) > 1 else []
    avg_lines = []
    for a in averages:
        label = "average over tasks" if a["n_tasks"] == a["of_tasks"] else \
            f"average over {a['n_tasks']}/{a['of_tasks']} tasks"
        avg_lines.append([label, _k_label(a["k_shot"]), a["method"], "mean", f"{a['score_mean']:.4f}",
                          f"{a['n_tasks']} tasks", _params_label(a["trainable_params"])])
    widths = [max(len(cells[i]) for cells in [header, *lines, *avg_lines]) for i in range(len(header))]
    right = {4, 5, 6}  # numbers align right

    def fmt(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    rule = "-" * len(fmt(header))
    out = [fmt(header), rule, *(fmt(c) for c in lines)]
    if avg_lines:
        out += [rule, *(fmt(c) for c in avg_lines)]
    return "\n".join(line.rstrip() for line in out) + "\n"


# ----------------------------------------------------------------------------------------------- plot


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG of score against trainable parameters (log x), one panel per (task, k).

    Each method keeps one colour and marker in every panel; error bars are the std over seeds. It draws
    on a bare Agg canvas rather than pyplot, so it neither needs a display nor changes the caller's
    matplotlib backend. A method with no trainable parameters is drawn at 1 (the log axis has no 0).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not rows:
        raise ValueError("nothing to plot: no rows")
    path = Path(path)
    panels: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in rows:
        panels.setdefault((row["task"], row["k_shot"]), []).append(row)
    keys = sorted(panels, key=lambda t: (t[0], _k_order(t[1])))
    methods = sorted({row["method"] for row in rows})
    colours = [f"C{i % 10}" for i in range(len(methods))]
    style = {m: (colours[i], _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.6 * ncols + 1.8, 3.6 * nrows), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        task, k = key
        for row in sorted(panels[key], key=lambda r: r["method"]):
            colour, marker = style[row["method"]]
            ax.errorbar([max(row["trainable_params"], 1.0)], [row["score_mean"]], yerr=[row["score_std"]],
                        fmt=marker, color=colour, markersize=8, capsize=3, label=row["method"])
        ax.set_xscale("log")
        ax.set_title(f"{task}, k={_k_label(k)}")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(panels[key][0]["main_metric"])
        ax.grid(True, which="major", alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    handles = [Line2D([], [], linestyle="", marker=style[m][1], color=style[m][0], markersize=8) for m in methods]
    fig.legend(handles=handles, labels=methods, loc="outside right upper", title="method")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# --------------------------------------------------------------------------------------------- report


def report(paths: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Collect, aggregate, and write ``report.json`` (the rows) and ``report.png`` into ``out_dir``.

    Returns ``{"table": str, "json": Path, "png": Path}``; the table is returned rather than printed so
    a command line can print it and a notebook can show it.
    """
    rows = aggregate(collect(paths))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_JSON
    text = json.dumps(rows, indent=2)
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    png_path = plot(rows, out_dir / REPORT_PNG)
    return {"table": format_table(rows), "json": json_path, "png": png_path}

"""FedPETuning's comparison at our scale: federated full fine-tuning against PEFT methods on Flower.

    python benchmarks/federated.py --data-dir ../shared/data/glue --device cuda --workers 12 --deadline 450

Grid: MiniLM-L6 (the embedded default, or --model), tasks RTE / MRPC / SST-2, data split IID and Dirichlet
alpha in {0.1, 1.0}, methods full / adapter / lora / prefix / bitfit / unipelt, seeds 1-3 (162 runs). Each run:
10 clients, 5 per round, 10 rounds, 1 local epoch (``unipelt.federated.run_federated``); SST-2 trains on
4,000 examples of its training set (--sst2-k), RTE and MRPC on all of theirs. Finished runs are skipped, so a
call cut short resumes in the next (on the same machine by its run folders; on a fresh one by
``--import-runs`` of an earlier call's ``summary.json``, whose runs are skipped and kept in the report).
Writes, into --results, ``summary.json`` (per task, split and method: the final dev score, mean ± std over
seeds, and the total bytes communicated; per run too) and ``federated.png`` (score against bytes, seed 1 of the
IID runs), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _pool import run_pool  # the script's folder is on sys.path

TASKS = ("rte", "mrpc", "sst2")
SPLITS = (None, 0.1, 1.0)  # None: IID
METHODS = ("full", "adapter", "lora", "prefix", "bitfit", "unipelt")
SEEDS = (1, 2, 3)


def run_dir(out: Path, task: str, alpha: float | None, method: str, seed: int) -> Path:
    return out / f"{task}-{split_name(alpha)}-{method}-s{seed}"


def split_name(alpha: float | None) -> str:
    return "iid" if alpha is None else f"a{alpha:g}"


def one_run(args: dict) -> dict:
    import torch
    import transformers

    from unipelt.federated import FederatedConfig, run_federated

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.time()
    results = run_federated(FederatedConfig(**args), log=lambda line: None)
    return {"out": args["out"], "score": results["score"], "seconds": time.time() - start}


def run_key(record: dict) -> tuple:
    return record["task"], record["alpha"], record["method"], record["seed"]


def imported_runs(paths: list[Path]) -> dict[tuple, dict]:
    """The per-run records of earlier calls' ``summary.json`` files, by (task, alpha, method, seed); records
    written before runs carried their trainable count take it from their cell."""
    runs: dict[tuple, dict] = {}
    for path in paths:
        summary = json.loads(path.read_text())
        params = {(c["task"], c["alpha"], c["method"]): c["trainable_params"] for c in summary["cells"]}
        for record in summary["runs"]:
            record.setdefault("trainable_params", params[(record["task"], record["alpha"], record["method"])])
            record.setdefault("device", summary["device"])  # older summaries name one device for all runs
            runs[run_key(record)] = record
    return runs


def grid(opts: argparse.Namespace, done: dict[tuple, dict]) -> list[dict]:
    jobs = []
    for seed in opts.seeds:  # seed outermost: a grid cut short has whole seeds of every cell
        for task in opts.tasks:
            for alpha in SPLITS:
                for method in opts.methods:
                    out = run_dir(opts.out, task, alpha, method, seed)
                    if (out / "results.json").exists() or (task, alpha, method, seed) in done:
                        continue
                    jobs.append({"task": task, "method": method, "model": opts.model, "data_dir": str(opts.data_dir),
                                 "out": str(out), "clients": opts.clients, "per_round": opts.per_round,
                                 "rounds": opts.rounds, "local_epochs": opts.local_epochs, "alpha": alpha,
                                 "seed": seed, "k_shot": opts.sst2_k if task == "sst2" else None,
                                 "device": opts.device, "resume": (out / "server_state.safetensors").exists()})
    return jobs


RUN_FIELDS = ("task", "alpha", "method", "seed", "score", "bytes_total", "payload_bytes", "trainable_params")


def task_averages(runs: list[dict]) -> list[dict]:
    """Per split and method, the score averaged over the tasks for each seed that every cell has, then the mean
    and std of that average over those seeds: the table the README shows, comparable across rows."""
    scores: dict[tuple, dict[int, float]] = {}
    for r in runs:
        scores.setdefault((r["task"], r["alpha"], r["method"]), {})[r["seed"]] = r["score"]
    if not scores:
        return []
    seeds = sorted(set.intersection(*(set(s) for s in scores.values())))
    rows = []
    for alpha in SPLITS:
        for method in METHODS:
            tasks = [task for task in TASKS if (task, alpha, method) in scores]
            if not tasks or not seeds:
                continue
            means = [statistics.mean(scores[(task, alpha, method)][seed] for task in tasks) for seed in seeds]
            rows.append({"alpha": alpha, "method": method, "tasks": tasks, "seeds": seeds,
                         "score": statistics.mean(means), "std": statistics.stdev(means) if len(means) > 1 else 0.0})
    return rows


def summarise(out: Path, results_dir: Path, device: str, imported: dict[tuple, dict] | None = None) -> str:
    merged = dict(imported or {})
    for path in sorted(out.glob("*/results.json")):  # a run finished here supersedes an imported one
        record = json.loads(path.read_text())
        merged[run_key(record)] = {**{k: record[k] for k in RUN_FIELDS}, "device": device}
    runs = sorted(merged.values(), key=lambda r: (r["task"], str(r["alpha"]), r["method"], r["seed"]))
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["task"], r["alpha"], r["method"]), []).append(r)
    full_bytes = {(t, a): statistics.mean(x["bytes_total"] for x in rs) for (t, a, m), rs in cells.items()
                  if m == "full"}
    rows, lines = [], [f"{'task':<5} {'split':<6} {'method':<8} {'score':>13} {'seeds':>5} {'MB total':>10} "
                       f"{'vs full':>8}"]
    for (task, alpha, method), rs in sorted(cells.items(), key=lambda c: (c[0][0], str(c[0][1]),
                                                                            METHODS.index(c[0][2]))):
        scores = [x["score"] for x in rs]
        mb = statistics.mean(x["bytes_total"] for x in rs) / 1e6
        ratio = full_bytes.get((task, alpha), 0) / 1e6 / mb if (task, alpha) in full_bytes else None
        row = {"task": task, "alpha": alpha, "method": method, "seeds": len(rs), "score": statistics.mean(scores),
               "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "bytes_total": mb * 1e6,
               "bytes_ratio_full_over_method": ratio, "trainable_params": rs[0]["trainable_params"]}
        rows.append(row)
        lines.append(f"{task:<5} {split_name(alpha):<6} {method:<8} "
                     f"{100 * row['score']:>6.1f} ± {100 * row['std']:>4.1f} "
                     f"{len(rs):>5} {mb:>10.2f} {'' if ratio is None else f'{ratio:>7.0f}x'}")
    averages = task_averages(runs)
    for row in averages:
        lines.append(f"{'avg':<5} {split_name(row['alpha']):<6} {row['method']:<8} "
                     f"{100 * row['score']:>6.1f} ± {100 * row['std']:>4.1f} "
                     f"{len(row['seeds']):>5}  (over {', '.join(row['tasks'])}; seeds every cell has)")
    table = "\n".join(lines) + "\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    devices = sorted({r["device"] for r in runs})  # runs of one report may come from several machines
    summary = {"device": " + ".join(devices), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "cells": rows, "task_average": averages, "runs": runs}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plotted = [p.parent for p in sorted(out.glob("*-iid-*-s1/results.json"))]
    if plotted:  # the plot: score against bytes, seed 1 of the IID runs, one line per task and method
        from unipelt.federated import report

        report(plotted, results_dir)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("UNIPELT_DATA_DIR", "../shared/data")) / "glue")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("out/federated"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "federated")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--sst2-k", type=int, default=4000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--import-runs", type=Path, nargs="+", default=[],
                        help="earlier calls' summary.json: their runs are not run again and stay in the report")
    parser.add_argument("--device-name", default=None,
                        help="the device this call's runs ran on (default: this machine's GPU, or cpu), for a "
                             "report rebuilt elsewhere (--summarise-only); each run keeps its own")
    opts = parser.parse_args()
    start = time.time()
    done = imported_runs(opts.import_runs)
    if not opts.summarise_only:
        jobs = grid(opts, done)
        print(f"{len(jobs)} runs to do, {opts.workers} workers", flush=True)
        run_pool(one_run, jobs, opts.workers, opts.deadline, start)
    import torch

    device = opts.device_name or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    print(summarise(opts.out, opts.results, device, done), end="")


if __name__ == "__main__":
    main()

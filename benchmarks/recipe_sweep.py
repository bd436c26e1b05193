"""Training-recipe sweep: one task and method under several variants of the run settings, many seeds.

    python benchmarks/recipe_sweep.py --task sst2 --method unipelt --k-shot 100 --seeds 1 2 3 4 5 \\
        --variant base: --variant prefix_lr3:part_lr.prefix=6e-4 --variant bs8:batch_size=8 --workers 8

A variant is ``NAME:field=value,field=value`` over ``unipelt.train.RunConfig`` fields (``part_lr.X``
sets one part's rate). Every run goes through ``unipelt.train.run`` in a worker process (the same
worker as ``glue_lowres.py``); finished runs in ``--out`` are skipped. Prints and writes a table of
mean ± std over seeds on the report split, per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _pool import run_pool  # noqa: E402
from glue_lowres import one_run  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    overrides: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("part_lr."):
            overrides.setdefault("part_lr", {})[key.split(".", 1)[1]] = float(parsed)
        else:
            overrides[key] = parsed
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--tasks", nargs="+", default=None, help="several tasks (overrides --task)")
    parser.add_argument("--method", default="unipelt")
    parser.add_argument("--k-shot", type=int, default=100)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:field=value,...")
    parser.add_argument("--epochs", type=float, default=30.0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("out/recipe_sweep"))
    parser.add_argument("--results", type=Path, default=None, help="write the table and JSON here (FILE stem)")
    parser.add_argument("--device-name", default="this machine")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()

    variants = dict(parse_variant(v) for v in opts.variant)
    tasks = opts.tasks or [opts.task]
    jobs = []
    for task in tasks:
        for name, overrides in variants.items():
            for seed in opts.seeds:
                out = opts.out / f"{task}-{name}-s{seed}"
                if (out / "results.json").exists():
                    continue
                job = {"task": task, "method": opts.method, "k_shot": opts.k_shot, "seed": seed,
                       "epochs": opts.epochs, "max_length": opts.max_length, "data_dir": opts.data_dir,
                       "model": opts.model, "device": opts.device, "out": str(out), "label": name,
                       "threads": opts.threads}
                job.update(overrides)
                jobs.append(job)
    print(f"{len(jobs)} runs, {opts.workers} workers", flush=True)
    run_pool(one_run, jobs, opts.workers)

    rows = []
    lines = [f"{opts.method}, K={opts.k_shot}, seeds {opts.seeds}, {opts.epochs:g} epochs, "
             f"max length {opts.max_length}; device: {opts.device_name}", "",
             "| task | variant | settings | mean | std | min | n | mean s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for task in tasks:
        for name, overrides in variants.items():
            found = [json.loads(p.read_text()) for p in sorted(opts.out.glob(f"{task}-{name}-s*/results.json"))]
            if not found:
                continue
            scores = [r["score"] for r in found]
            row = {"task": task, "variant": name, "overrides": overrides, "scores": scores,
                   "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                   "seconds": statistics.mean(r["wall_time_s"] for r in found)}
            rows.append(row)
            lines.append(f"| {task} | {name} | {json.dumps(overrides)} | {row['mean']:.3f} | {row['std']:.3f} | "
                         f"{min(scores):.3f} | {len(scores)} | {row['seconds']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if opts.results:
        opts.results.parent.mkdir(parents=True, exist_ok=True)
        opts.results.with_suffix(".md").write_text(table + "\n")
        opts.results.with_suffix(".json").write_text(json.dumps({"device": opts.device_name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Keep the runs of 2026-12-05 whose folders were lost: ``partial.json``'s runs (the ``done`` lines the sweep
printed on the H100) become score-only records in ``runs.jsonl``, so the next device call does not run them
again and the report counts them.

    python benchmarks/seed001/done_lines.py   # appends to benchmarks/results/seed001/runs.jsonl

A score-only record holds what the line said (task, setting, label, seed, main metric, its score to four
places, the training seconds) and ``"record": "score"``; the report takes the trainable counts from a sibling
run of the same task and label. Valid because the code that trained them (8e8edca) computes what the current
code computes: since then `src` changed only in cli.py, sweep.py, report.py, federated.py, serialization.py
(file modes), models.py (a new helper) and core.py (one installer function shared, same hooks); `git diff
--stat 8e8edca HEAD -- src` lists them. Runs already in the file are kept.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from unipelt.serialization import atomic_write_text  # noqa: E402
from unipelt.sweep import load_spec, plan  # noqa: E402

RESULTS = ROOT / "benchmarks/results/seed001"


def main() -> None:
    partial = json.loads((RESULTS / "partial.json").read_text())
    source = f"'done' line of {partial['date']}, {partial['device']}, code {partial['code']}; run folder lost"
    spec = load_spec(ROOT / "benchmarks/seed001/spec.yaml")
    spec.data_dir = str(ROOT.parent / "shared/data")
    with tempfile.TemporaryDirectory() as out:
        jobs = {job.name: job for job in plan(spec, out)}
    runs = RESULTS / "runs.jsonl"
    lines = runs.read_text().splitlines() if runs.exists() else []
    have = {json.loads(line)["run"] for line in lines if line.strip()}
    added = 0
    for run in partial["runs"]:
        name = f"{run['task']}/{run['setting']}/{run['method']}/seed{run['seed']}"
        if name not in jobs:
            raise SystemExit(f"{name} is not a run of benchmarks/seed001/spec.yaml")
        if name in have:
            continue
        job = jobs[name]
        results = {"task": job.task, "method": job.config["method"], "label": job.label, "seed": job.seed,
                   "k_shot": job.config.get("k_shot"), "split": "dev", "main_metric": run["metric"],
                   "score": run["score"], "metrics": {run["metric"]: run["score"]},
                   "wall_time_s": float(run["seconds"]), "record": "score", "source": source}
        lines.append(json.dumps({"run": name, "results": results}, separators=(",", ":")))
        added += 1
    atomic_write_text(runs, "".join(line + "\n" for line in lines))
    print(f"{added} score-only runs added to {runs} ({len(lines)} in all)")


if __name__ == "__main__":
    main()

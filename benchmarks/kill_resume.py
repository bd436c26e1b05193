"""Kill `unipelt train` with SIGKILL at random moments, resume it until it finishes, compare with an uninterrupted run.

    python benchmarks/kill_resume.py --data-dir ../shared/data/glue --trials 20 --out out/kill_resume \\
        --results benchmarks/results/kill_resume

Each trial starts the same small run (a 2-layer BERT of hidden size 32 with MiniLM's tokenizer, SST-2 K=16,
300 steps of LoRA, a validation and a checkpoint every 2 steps), kills its process group at a uniformly random
time within the uninterrupted run's wall time (so kills land in start-up, steps, validation, checkpoint writes
and the final save), checks that what the kill left reads (the checkpoint loads, the delta matches its
unipelt.json, the JSON files parse), and resumes with ``--resume``; after ``--max-kills`` kills it lets the run
finish. Passes when every trial's final delta equals the uninterrupted run's bit for bit and its scores and
validation history match.
Writes ``summary.json`` and ``README.md`` into ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> str:
    from unipelt.models import save_tiny_model

    return save_tiny_model(folder)


def small_glue(source: Path, folder: Path, rows: int = 120) -> Path:
    task = folder / "SST-2"
    task.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = (source / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (task / name).write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return folder


def command(model: str, data: Path, out: Path, method: str, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "unipelt.cli", "train", "--task", "sst2", "--method", method, "--model", model,
            "--data-dir", str(data), "--out", str(out), "--k-shot", "16", "--max-steps", str(steps),
            "--eval-every", "2", "--patience", "1000", "--batch-size", "8", "--max-length", "32", "--device", "cpu",
            "--no-progress", *(["--resume"] if resume else [])]


# every run alike: one thread (a thread count changes float sums), this checkout's code, no hub
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def readable(out: Path) -> str | None:
    """None when the folder a kill left is sound (leftover temporary files aside), else what is wrong."""
    from unipelt import serialization
    from unipelt.train.loop import read_checkpoint

    try:
        if (out / "checkpoint.pt").exists():
            read_checkpoint(out / "checkpoint.pt")
        if (out / serialization.META_FILE).exists() or (out / (serialization.META_FILE + ".new")).exists():
            meta = serialization.read_meta(out)
            if serialization._sha256(out / serialization.DELTA_FILE) != meta["delta_sha256"]:
                return "delta does not match its unipelt.json"
        for name in ("run.json", "results.json"):
            if (out / name).exists():
                json.loads((out / name).read_text())
    except Exception as error:  # what is recorded is the failure itself
        return f"{type(error).__name__}: {error}"
    return None


def same(a: Path, b: Path) -> str | None:
    ta, tb = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    if sorted(ta) != sorted(tb) or not all(torch.equal(ta[k], tb[k]) for k in ta):
        return "delta differs"
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    if ra["score"] != rb["score"] or ra["validation"]["history"] != rb["validation"]["history"]:
        return "scores differ"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="GLUE folder holding SST-2/")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial before it may finish")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=None, help="write summary.json and README.md here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.out or Path(tempfile.mkdtemp(prefix="kill_resume."))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "model") if not (work / "model").exists() else str(work / "model")
    data = small_glue(args.data_dir, work / "glue") if not (work / "glue").exists() else work / "glue"

    whole = work / "whole"
    began = time.perf_counter()
    if not (whole / "results.json").exists():
        subprocess.run(command(model, data, whole, args.method, args.steps, False), check=True, env=ENV,
                       capture_output=True)
    span = time.perf_counter() - began
    print(f"uninterrupted run: {span:.1f} s")

    trials, kills, problems = [], 0, []
    for trial in range(args.trials):
        out = work / f"trial{trial}"
        log = work / f"trial{trial}.log"
        trial_kills, attempts, when = 0, 0, []
        while True:
            attempts += 1
            process = start(command(model, data, out, args.method, args.steps, resume=attempts > 1), log)
            if trial_kills < args.max_kills:
                delay = rng.uniform(0.0, span)
                try:
                    process.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    trial_kills += 1
                    when.append(round(delay, 2))
                    problem = readable(out)
                    if problem:
                        problems.append(f"trial {trial}, kill {trial_kills}: {problem}")
                    continue
            else:
                process.wait()
            if process.returncode != 0:
                problems.append(f"trial {trial}: exit {process.returncode} (log {log})")
                break
            if (out / "results.json").exists():
                break
        kills += trial_kills
        verdict = same(whole, out) if (out / "results.json").exists() else "no results"
        if verdict:
            problems.append(f"trial {trial}: {verdict}")
        trials.append({"trial": trial, "kills": trial_kills, "kill_times_s": when, "starts": attempts,
                       "equal_to_uninterrupted": verdict is None})
        print(f"trial {trial}: {trial_kills} kills at {when} s, {attempts} starts, "
              f"{'same delta and scores' if verdict is None else verdict}")

    summary = {
        "benchmark": "kill_resume", "date": time.strftime("%Y-%m-%d"), "device": "CPU",
        "command": "python benchmarks/kill_resume.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "method": args.method, "steps": args.steps, "uninterrupted_s": round(span, 1), "trials": len(trials),
        "kills_survived": kills, "runs_compared": sum(1 for t in trials if t["starts"] >= 1),
        "runs_equal": sum(t["equal_to_uninterrupted"] for t in trials), "problems": problems, "per_trial": trials,
    }
    print(f"{kills} kills survived, {summary['runs_equal']}/{len(trials)} runs equal to the uninterrupted one, "
          f"{len(problems)} problems")
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.results / "README.md").write_text(
            "# Killed runs resume exactly\n\n"
            f"`{summary['command']}` ({summary['date']}, {summary['device']}): {len(trials)} trials of a "
            f"{args.steps}-step {args.method} run (uninterrupted {span:.1f} s), each killed with SIGKILL at "
            f"random times up to {args.max_kills} times and resumed with `--resume`.\n\n"
            "| trials | kills survived | runs equal to the uninterrupted one (delta bit for bit, scores) | "
            "problems |\n|---:|---:|---:|---:|\n"
            f"| {len(trials)} | {kills} | {summary['runs_equal']} | {len(problems)} |\n\n"
            + ("".join(f"- {p}\n" for p in problems) if problems else "")
            + "Per trial, the kill times: `summary.json`.\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

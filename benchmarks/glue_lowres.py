"""Low-resource GLUE: every method at K=100 and K=1000, several seeds, on the MiniLM default.

    python benchmarks/glue_lowres.py --data-dir ../shared/data/glue --out out/glue_lowres --workers 8

Runs the grid (tasks x K x methods x seeds), each run through ``unipelt.train.run`` in a worker
process; runs already finished in ``--out`` are skipped, so the grid can be spread over several
calls (``--deadline`` stops starting new runs after that many seconds). Then it aggregates every
finished run into ``--results`` (JSON rows and a markdown table: mean and std over seeds of each
task's main metric on dev, the average over tasks, and whether UniPELT with the prompt layer is at
or above the best single method).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _pool import run_pool  # the script's folder is on sys.path

TASKS = ("sst2", "rte", "mrpc", "stsb")
KS = (100, 1000)
SEEDS = (1, 2, 3)
# label: (method, options, learning rate or None for the trainer's default, DEFAULT_LR in unipelt.train.loop)
METHODS = {
    "pfeiffer": ("pfeiffer", {}, None),
    "prefix": ("prefix", {}, None),
    "lora": ("lora", {}, None),
    "prompt": ("prompt", {}, None),
    "mam": ("mam", {}, None),
    "unipelt": ("unipelt", {}, None),
    # the seed's prompt layer as adapters builds it (10 tokens, U(-0.5, 0.5), joined after the embeddings)
    "unipelt+prompt": ("unipelt", {"prompt": {"length": 10, "join": "auto", "init": "uniform"}}, None),
    # variants measured beside the defaults: our prompt (placeholders among the input ids, vocabulary init), and
    # the prefix trained at a tenth of the rate, as the former default did
    "unipelt+prompt_input": ("unipelt", {"prompt": {"length": 10, "init": "vocab", "join": "input"}}, None),
    "unipelt_prefix_lr": ("unipelt", {}, None),
    # the library's UniPELT before it followed the authors' code (a named preset), and with our prompt
    "unipelt_legacy": ("unipelt_legacy", {}, None),
    "unipelt_legacy+prompt": ("unipelt_legacy", {"prompt": {"length": 10, "init": "vocab", "join": "input"}}, None),
    "full": ("full", {}, 5e-5),
    # the rest of the catalogue at its default rate; not in the table yet
    "compacter": ("compacter", {}, None),
    "compacter++": ("compacter++", {}, None),
    "krona": ("krona", {}, None),
    "krona_ffn": ("krona_ffn", {}, None),
    "kadaptation": ("kadaptation", {}, None),
    "adapter_bias": ("adapter_bias", {}, None),
    "phm_adapter": ("phm_adapter", {}, None),
    "sparse_adapter": ("sparse_adapter", {}, None),
    "rational": ("rational", {}, None),
    # Poly on one task: the inventory with that task's routing (its multi-task transfer: transfer.py);
    # ATTEMPT needs source prompts, so it is measured there only, and VPT takes images
    "poly": ("poly", {}, None),
    "poly_s": ("poly_s", {}, None),
    "poly_mu": ("poly_mu", {}, None),
}
PART_LR = {"unipelt_prefix_lr": {"prefix": 1e-4}}  # label -> its parts' own rates
SINGLE = ("pfeiffer", "prefix", "lora", "prompt")
TABLE = ("pfeiffer", "prefix", "lora", "prompt", "mam", "unipelt", "unipelt+prompt")  # the committed table's runs


def run_dir(out: Path, task: str, k: int, label: str, seed: int) -> Path:
    return out / f"{task}-k{k}-{label.replace('+', '_')}-s{seed}"


def one_run(args: dict) -> dict:
    """A worker: one training run (imports here so that each process starts clean)."""
    import torch
    import transformers

    from unipelt.train import RunConfig, run

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.pop("threads"))
    label = args.pop("label")
    start = time.time()
    results = run(RunConfig(**args, progress=False), log=lambda s: None)
    results["label"] = label
    Path(args["out"], "label.json").write_text(json.dumps({"label": label}))
    return {"out": args["out"], "score": results["score"], "seconds": time.time() - start}


def grid(opts: argparse.Namespace) -> list[dict]:
    # seed outermost: a grid cut short by --deadline has whole seeds of every (task, K, method), not all
    # seeds of some
    jobs = []
    for seed in opts.seeds:
        for k in opts.ks:
            for task in opts.tasks:
                for label in opts.methods:
                    method, options, lr = METHODS[label]
                    out = run_dir(opts.out, task, k, label, seed)
                    if (out / "results.json").exists():
                        continue
                    epochs = opts.epochs_small if k <= 100 else opts.epochs_large
                    jobs.append({"task": task, "method": method, "method_options": options, "k_shot": k,
                                 "seed": seed, "epochs": epochs, "lr": lr, "data_dir": str(opts.data_dir),
                                 "out": str(out),
                                 "model": opts.model, "max_length": opts.max_length, "batch_size": 16,
                                 "device": opts.device, "resume": (out / "checkpoint.pt").exists(),
                                 "label": label, "threads": opts.threads,
                                 "part_lr": {**PART_LR.get(label, {}),
                                             **{p.split("=")[0]: float(p.split("=")[1]) for p in opts.part_lr
                                                if method in ("unipelt", "unipelt_legacy", "mam")}}})
    return jobs


def collect(out: Path) -> list[dict]:
    rows = []
    for results in sorted(out.glob("*/results.json")):
        r = json.loads(results.read_text())
        label_file = results.parent / "label.json"
        r["label"] = json.loads(label_file.read_text())["label"] if label_file.exists() else r["method"]
        rows.append(r)
    return rows


def summarise(rows: list[dict], device: str) -> tuple[dict, str]:
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["k_shot"], r["label"]), []).append(r)
    table = []
    for (task, k, label), runs in sorted(groups.items()):
        scores = [r["score"] for r in runs]
        table.append({"task": task, "k": k, "method": label, "metric": runs[0]["main_metric"], "n": len(runs),
                      "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                      "trainable_params": runs[0]["trainable_params"],
                      "seconds": statistics.mean(r["wall_time_s"] for r in runs)})
    ks = sorted({t["k"] for t in table})
    labels = [m for m in METHODS if any(t["method"] == m for t in table)]
    tasks = [t for t in TASKS if any(row["task"] == t for row in table)]
    models = sorted({Path(str(r["model"])).name for r in rows if r.get("model")}) or ["?"]
    lines = [f"Device: {device}. Model: {', '.join(models)}. Dev-set scores, mean ± std over seeds "
             f"(accuracy for SST-2/RTE, F1 for MRPC, Pearson for STS-B). MRPC and STS-B dev are the re-split files "
             f"of shared/data, not GLUE's published dev sets.", ""]
    verdicts = {}
    for k in ks:
        lines += [f"### K = {k}", "", "| method | " + " | ".join(tasks) + " | average | trainable |",
                  "|---|" + "---:|" * (len(tasks) + 2)]
        averages = {}
        for label in labels:
            cells, means = [], []
            params = ""
            for task in tasks:
                row = next((t for t in table if t["task"] == task and t["k"] == k and t["method"] == label), None)
                if row is None:
                    cells.append("-")
                    continue
                cells.append(f"{row['mean']:.3f} ± {row['std']:.3f} ({row['n']})")
                means.append(row["mean"])
                params = f"{row['trainable_params']:,}"
            avg = sum(means) / len(means) if len(means) == len(tasks) else None
            averages[label] = avg
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg:.3f} |" if avg is not None
                         else f"| {label} | " + " | ".join(cells) + " | - |")
            lines[-1] += f" {params} |"
        singles = {m: averages[m] for m in SINGLE if averages.get(m) is not None}
        if singles and averages.get("unipelt+prompt") is not None:
            best = max(singles, key=singles.get)
            verdicts[k] = {"best_single": best, "best_single_average": singles[best],
                           "unipelt_prompt_average": averages["unipelt+prompt"],
                           "unipelt_average": averages.get("unipelt"),
                           "claim_holds": averages["unipelt+prompt"] >= singles[best]}
            v = verdicts[k]
            lines += ["", f"UniPELT+prompt average {v['unipelt_prompt_average']:.3f} vs best single method "
                          f"({best}) {v['best_single_average']:.3f}: "
                          f"{'at or above' if v['claim_holds'] else 'below'} it."]
        lines.append("")
    return {"device": device, "rows": table, "verdicts": verdicts}, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("UNIPELT_DATA_DIR", "../shared/data"))
                        / "glue")
    parser.add_argument("--out", type=Path, default=Path("out/glue_lowres"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "glue_lowres")
    parser.add_argument("--model", default=None, help="default: the embedded all-MiniLM-L6-v2")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(TABLE), choices=list(METHODS),
                        help="default: the methods of the committed table; any of the catalogue by name")
    parser.add_argument("--epochs-small", type=float, default=30.0, help="epochs at K <= 100")
    parser.add_argument("--epochs-large", type=float, default=10.0, help="epochs at K > 100")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    parser.add_argument("--device-name", default=None, help="how to name the device in the results")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--add-runs", nargs="+", type=Path, default=[], metavar="RUNS.jsonl",
                        help="runs of earlier calls (a *.runs.jsonl this script wrote) to join the table; a run "
                             "also in --out is taken from --out, one in several files from the first")
    parser.add_argument("--part-lr", action="append", default=[], metavar="METHOD=LR",
                        help="a learning rate for one part of a composition, e.g. prefix=2e-4")
    parser.add_argument("--lr", action="append", default=[], metavar="LABEL=LR",
                        help="override a method's learning rate, e.g. --lr prefix=5e-4")
    opts = parser.parse_args()
    for item in opts.lr:
        label, _, value = item.partition("=")
        method, options, _ = METHODS[label]
        METHODS[label] = (method, options, float(value))
    opts.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not opts.summarise_only:
        jobs = grid(opts)
        print(f"{len(jobs)} runs to do, {opts.workers} workers", flush=True)
        run_pool(one_run, jobs, opts.workers, opts.deadline, start)
    import torch

    device = opts.device_name or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    rows = collect(opts.out)
    here = {(r["task"], r["k_shot"], r["label"], r["seed"]) for r in rows}
    for path in opts.add_runs:
        earlier = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        new = [r for r in earlier if (r["task"], r["k_shot"], r["label"], r["seed"]) not in here]
        rows += new
        here |= {(r["task"], r["k_shot"], r["label"], r["seed"]) for r in new}
    summary, table = summarise(rows, device)
    opts.results.mkdir(parents=True, exist_ok=True)
    (opts.results / "glue_lowres.json").write_text(json.dumps(summary, indent=2) + "\n")
    # every run's own score too, so that seeds run in later calls can join the same table
    keep = ("task", "k_shot", "label", "seed", "main_metric", "score", "trainable_params", "wall_time_s", "model")
    (opts.results / "glue_lowres.runs.jsonl").write_text(
        "".join(json.dumps({key: r.get(key) for key in keep}) + "\n" for r in rows))
    (opts.results / "glue_lowres.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

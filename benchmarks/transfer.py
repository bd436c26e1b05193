"""Multi-task transfer: Poly and ATTEMPT trained on source GLUE tasks, then a held-out task at K shots,
against training that task from scratch.

    python benchmarks/transfer.py --data-dir ../shared/data/glue --out out/transfer --seeds 1 2 3

Per seed, on the MiniLM default (or --model):
- sources: ``poly`` on the source tasks together (K per task), and one ``prompt`` per source task;
- target (the held-out task, K-shot): ``lora`` and ``prompt`` from scratch; ``poly`` from the inventory
  with the routing alone (``--routing-only``) and with everything trained; ``attempt`` over the source
  prompts.
Each method trains at its default rates (its reference's): Poly's inventory at 1e-3 and its routing logits at
0.1, ATTEMPT at 0.3. Prompts are 100 tokens long by default, ATTEMPT's reference length (its sources must
have its length).
Prints a table (mean and std over seeds of the target's main metric on dev) and writes JSON beside
the runs. Runs already finished in ``--out`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def train(out: Path, **kwargs) -> dict:
    from unipelt.train import RunConfig, run

    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    return run(RunConfig(out=str(out), progress=False, **kwargs), log=lambda s: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, default=Path("out/transfer"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--sources", nargs="+", default=["sst2", "mrpc", "cola"])
    parser.add_argument("--target", default="rte")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt-length", type=int, default=100)  # ATTEMPT's prefix_dim; the sources' length too
    opts = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    common = {"model": opts.model, "k_shot": opts.k, "epochs": opts.epochs, "max_length": opts.max_length,
              "data_dir": opts.data_dir, "device": opts.device}
    prompt = {"length": opts.prompt_length}
    rows = []
    start = time.time()
    for seed in opts.seeds:
        base = opts.out / f"seed{seed}"
        inventory = base / "poly-sources"
        train(inventory, task=",".join(opts.sources), method="poly", seed=seed, **common)
        source_prompts = []
        for task in opts.sources:
            folder = base / f"prompt-{task}"
            train(folder, task=task, method="prompt", method_options=prompt, seed=seed, **common)
            source_prompts.append(str(folder))
        target = {"task": opts.target, "seed": seed, **common}
        runs = {
            "lora (scratch)": train(base / "target-lora", method="lora", **target),
            "prompt (scratch)": train(base / "target-prompt", method="prompt", method_options=prompt, **target),
            "poly routing only": train(base / "target-poly-routing", method="poly", from_inventory=str(inventory),
                                       routing_only=True, **target),
            "poly from inventory": train(base / "target-poly-all", method="poly", from_inventory=str(inventory),
                                         **target),
            "attempt": train(base / "target-attempt", method="attempt",
                             method_options={**prompt, "sources": source_prompts}, **target),
        }
        rows += [{"seed": seed, "method": label, "score": r["score"], "metric": r["main_metric"],
                  "trainable": r["trainable_params"]} for label, r in runs.items()]
    table = []
    for label in dict.fromkeys(r["method"] for r in rows):
        scores = [r["score"] for r in rows if r["method"] == label]
        table.append({"method": label, "n": len(scores), "mean": statistics.mean(scores),
                      "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                      "trainable": next(r["trainable"] for r in rows if r["method"] == label)})
    lines = [f"{opts.target} at K={opts.k} after sources {', '.join(opts.sources)} "
             f"({rows[0]['metric']}, dev, seeds {opts.seeds}, {time.time() - start:.0f} s)", "",
             "| method | score | trainable |", "|---|---:|---:|"]
    lines += [f"| {t['method']} | {t['mean']:.4f} ± {t['std']:.4f} (n={t['n']}) | {t['trainable']:,} |" for t in table]
    print("\n".join(lines))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "transfer.json").write_text(json.dumps({"options": {k: str(v) for k, v in vars(opts).items()},
                                                        "rows": rows, "table": table}, indent=2) + "\n")
    (opts.out / "transfer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

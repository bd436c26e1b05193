"""Merged inference against the bare model, side by side in one process (issue 5: within 2%).

For each mergeable method: attach it to a copy of the random base, move its delta away from zero,
merge, then time the bare and the merged model in alternation (``--rounds`` rounds of ``--steps``
calls each, CUDA events on a GPU, bf16 autocast), so that drift of the machine hits both alike. It
also checks that the merged model computes the unmerged one's function.

    python benchmarks/merged_inference.py --shape vit-base --methods lora ia3 ln kadaptation --out merged.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from typing import Any

import torch

import unipelt
from unipelt.bench import case


def _runner(model: torch.nn.Module, inputs: dict[str, torch.Tensor], cuda: bool):
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def run() -> None:
        with torch.no_grad(), autocast():
            model(**inputs)

    return run


def compare(shape_name: str, methods: list[str], device: str, steps: int, rounds: int) -> dict[str, Any]:
    shape = case.SHAPES[shape_name]
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        # frozen like the merged model: autocast caches its casts of weights that require grad, and an
        # unfrozen bare model measured 6-15% slower than its merged copies (docs/findings.md)
        bare = case.build_base(shape).eval().requires_grad_(False)
    inputs = case.step_inputs("unipelt", bare, case.random_batch(shape).to(device))
    rows = []
    for method in methods:
        model = case.attach("unipelt", method, copy.deepcopy(bare).requires_grad_(True), shape["family"]).to(device)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
            unmerged = case.hidden(model.eval()(**inputs)).float()
        merged = unipelt.merge(model)
        if unipelt.core.deltas(merged):
            rows.append({"method": method, "error": "not mergeable"})
            continue
        with torch.no_grad():
            error = (case.hidden(merged(**inputs)).float() - unmerged).abs().max().item()
        run_bare, run_merged = _runner(bare, inputs, cuda), _runner(merged, inputs, cuda)
        bare_ms, merged_ms = [], []
        for r in range(rounds):
            warmup = 5 if r == 0 else 0
            bare_ms += case.timed(run_bare, steps, warmup, cuda)
            merged_ms += case.timed(run_merged, steps, warmup, cuda)
        b, m = statistics.median(bare_ms), statistics.median(merged_ms)
        rows.append({"method": method, "bare_ms": b, "merged_ms": m, "ratio": m / b, "max_abs_diff_vs_unmerged": error})
        del model, merged
    name = torch.cuda.get_device_name() if cuda else "CPU"
    return {"shape": shape_name, "device": name, "steps": steps, "rounds": rounds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="bert-base")
    parser.add_argument("--methods", nargs="+", default=["lora", "ia3", "ln", "kadaptation", "adapter_bias", "krona"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="merged_inference.json")
    args = parser.parse_args()
    result = compare(args.shape, args.methods, args.device, args.steps, args.rounds)
    print(f"{result['shape']} on {result['device']}: inference, bare vs merged, alternating "
          f"({args.rounds} rounds x {args.steps} calls), median ms")
    print("| method | bare ms | merged ms | merged / bare | max abs diff vs unmerged |")
    print("|---|---:|---:|---:|---:|")
    for row in result["rows"]:
        if "error" in row:
            print(f"| {row['method']} | - | - | - | {row['error']} |")
        else:
            print(f"| {row['method']} | {row['bare_ms']:.2f} | {row['merged_ms']:.2f} | {row['ratio']:.3f} | "
                  f"{row['max_abs_diff_vs_unmerged']:.2e} |")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()

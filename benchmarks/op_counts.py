"""Kernels a training step launches, counted on the CPU: a deterministic proxy for a launch-bound GPU step.

    python benchmarks/op_counts.py                                  # every method of ours, bert-base-narrow
    python benchmarks/op_counts.py --peers peft --out out/ops.json

At BERT-base's batch 32 x 128 an H100 step waits on the CPU launching kernels (docs/findings.md):
the number of kernels is what the eager step time follows. This counts the ATen operations one training
step (forward, backward, AdamW) dispatches under bf16 autocast, leaving out views (no kernel) and the
optimizer's reads of its CPU step counters (no kernel either), on the same random model as ``speed.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unipelt.bench import METHODS, SHAPES, case

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
             "permute", "as_strided", "reshape", "detach", "alias", "split", "unbind", "narrow", "_reshape_alias",
             "split_with_sizes", "_local_scalar_dense", "lift_fresh", "_record_function_enter_new",
             "_record_function_exit"}


def kernels_per_step(peer: str, method: str, shape_name: str) -> collections.Counter:
    """ATen operations (kernels) per training step of one benchmark case, by operation name."""
    shape = SHAPES[shape_name]
    model = case.attach(peer, method, case.build_base(shape), shape["family"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True) if trainable else None
    inputs = case.step_inputs(peer, model, case.random_batch(shape))
    skip = case.virtual_tokens(peer, method)
    direction = case.loss_direction(model, inputs, skip)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (case.hidden(model(**inputs), skip).float() * direction).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for leaf in inputs.values():
            leaf.grad = None

    step()  # the optimizer's state exists from the second step on
    counts: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name not in NO_KERNEL:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bert-base-narrow", choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if "unipelt" in METHODS[m]])
    parser.add_argument("--peers", nargs="*", default=[], choices=["peft"])
    parser.add_argument("--out", type=Path, default=None)
    opts = parser.parse_args()
    floor = sum(kernels_per_step("floor", "-", opts.shape).values())
    rows = []
    for method in opts.methods:
        for peer in ["unipelt", *opts.peers]:
            if peer in METHODS[method]:
                counts = kernels_per_step(peer, method, opts.shape)
                rows.append({"method": method, "peer": peer, "kernels": sum(counts.values()),
                             "x_floor": sum(counts.values()) / floor, "by_op": dict(counts.most_common())})
    print(f"{opts.shape}: floor {floor} kernels per training step\n")
    print("| method | library | kernels | x floor |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['peer']} | {r['kernels']} | {r['x_floor']:.2f} |")
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps({"shape": opts.shape, "floor": floor, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where a compiled training step's time goes: forward+backward, then each AdamW implementation on top.

For each method (each in its own process, BERT-base shape, bf16 autocast, ``torch.compile`` in
``reduce-overhead`` mode) it times, in one process and on one compiled model:

- ``fwd_bwd``: forward and backward alone (gradients dropped);
- ``foreach`` / ``fused`` / ``compiled``: the full step with AdamW's multi-tensor update, its fused
  kernel, or ``optimizer.step`` itself compiled (one graph for every tensor's update);
- ``host_foreach`` / ``host_fused``: the host time of ``optimizer.step()`` alone, without waiting for the GPU.

The gap between a full step and ``fwd_bwd`` is what the update costs; beside the trainable-tensor
count it shows whether that cost follows the number of tensors or their size.

    python benchmarks/step_phases.py --methods lora unipelt compacter --out phases.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def _median_ms(fn, steps: int, warmup: int, sync: bool = True) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        if not sync:
            torch.cuda.synchronize()
    return statistics.median(times)


def host_profile(fn, steps: int = 10) -> dict[str, Any]:
    """Where the host time of ``steps`` calls of ``fn`` goes: Python functions (cProfile, by own time) and
    torch's host-side regions (the profiler's CPU events, by own time)."""
    import cProfile
    import pstats

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    python_rows = sorted(((v[2] / steps * 1e3, v[0] / steps, f"{k[0].rsplit('/', 2)[-1]}:{k[1]}:{k[2]}")
                          for k, v in stats.stats.items()), reverse=True)[:25]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = sorted(trace.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    return {"python_ms_per_step": [[round(ms, 3), round(calls, 1), name] for ms, calls, name in python_rows],
            "torch_cpu_ms_per_step": [[round(e.self_cpu_time_total / steps / 1e3, 3), e.count // steps, e.key]
                                      for e in events]}


def measure(method: str, shape_name: str, steps: int, profile_host: bool = False) -> dict[str, Any]:
    from unipelt.bench import case

    shape = case.SHAPES[shape_name]
    peer = "floor" if method == "-" else "unipelt"
    with torch.device("cuda"):
        model = case.build_base(shape)
    model = case.attach(peer, method, model, shape["family"]).cuda()
    inputs = case.step_inputs(peer, model, case.random_batch(shape).cuda())
    skip = case.virtual_tokens(peer, method)
    direction = case.loss_direction(model, inputs, skip)
    model = torch.compile(model, mode="reduce-overhead")
    trainable = [p for p in model.parameters() if p.requires_grad]
    leaves = [t for t in inputs.values() if t.requires_grad]

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (case.hidden(model(**inputs), skip).float() * direction).mean()
        loss.backward()
        for leaf in leaves:
            leaf.grad = None

    def drop_grads() -> None:
        for p in trainable:
            p.grad = None

    result: dict[str, Any] = {"method": method, "trainable_tensors": len(trainable),
                              "trainable": sum(p.numel() for p in trainable)}
    result["fwd_bwd"] = _median_ms(lambda: (forward_backward(), drop_grads()), steps, 5)
    if profile_host:
        result.update(host_profile(lambda: (forward_backward(), drop_grads())))
        return result
    if not trainable:
        return result
    for name, kwargs in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, **kwargs)

        def step(optimizer=optimizer) -> None:
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result[name] = _median_ms(step, steps, 5)
        forward_backward()
        result[f"host_{name}"] = _median_ms(optimizer.step, steps, 2, sync=False)
        drop_grads()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)
    compiled_update = torch.compile(optimizer.step)

    def compiled_step() -> None:
        forward_backward()
        compiled_update()
        optimizer.zero_grad(set_to_none=True)

    try:
        result["compiled"] = _median_ms(compiled_step, steps, 5)
    except Exception as error:  # noqa: BLE001 (keep the other phases of this method)
        result["compiled_error"] = str(error)[:200]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["-", "lora", "unipelt", "compacter", "phm_adapter"])
    parser.add_argument("--shape", default="bert-base")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="step_phases.json")
    parser.add_argument("--host-profile", action="store_true",
                        help="forward+backward only, with where its host time goes (cProfile, profiler)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.shape, args.steps, args.host_profile)))
        return
    rows = []
    print(f"{args.shape} on {torch.cuda.get_device_name()}, compiled (reduce-overhead), ms per step (median)")
    columns = ["fwd_bwd", "foreach", "fused", "compiled", "host_foreach", "host_fused"]
    print("| method | tensors | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for method in args.methods:
        done = subprocess.run([sys.executable, __file__, "--one", method, "--shape", args.shape,
                               "--steps", str(args.steps), *(["--host-profile"] if args.host_profile else [])],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"method": method, "error": done.stderr[-300:]}
        rows.append(row)
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else "-" for c in columns]
        print(f"| {method} | {row.get('trainable_tensors', '-')} | " + " | ".join(cells) + " |",
              row.get("error", row.get("compiled_error", "")), flush=True)
        for key in ("python_ms_per_step", "torch_cpu_ms_per_step"):
            for cells in row.get(key, []):
                print(f"    {key[:6]} {cells[0]:8.3f} ms {cells[1]:>7} x  {cells[2]}")
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

"""What is alive at a benchmark case's peak of GPU memory: the allocations, their sizes and the Python
frames that made them (the CUDA caching allocator's recorded history).

    python benchmarks/peak_trace.py --peer unipelt --method parallel --out ours.json
    PYTHONPATH=.bench/adapters-env python benchmarks/peak_trace.py --peer adapters --method parallel --out theirs.json

The case runs as ``unipelt bench`` measures it (``case.measure``, compiled with ``reduce-overhead``,
fused AdamW, a few steps). Recording the history costs memory and time of its own, so the traced peak
is compared with another trace, not with a benchmark run's figure. Runs under ``adapters``' own
``transformers`` too: like ``case.py`` it imports nothing from unipelt unless the case is unipelt's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

CASE_FILE = Path(__file__).resolve().parents[1] / "src" / "unipelt" / "bench" / "case.py"


def _case_module():
    spec = importlib.util.spec_from_file_location("unipelt_bench_case", CASE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def live_at_peak(events: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """Replay allocator events (``alloc`` / ``free_completed``): the peak in bytes and the blocks alive then."""
    live: dict[int, dict[str, Any]] = {}
    total = peak = 0
    at_peak: list[dict[str, Any]] = []
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, at_peak


def frames(event: dict[str, Any], depth: int = 4) -> list[str]:
    """The innermost Python frames outside torch (torch's own when there are none)."""
    python = [f for f in event.get("frames", []) if f["filename"].endswith(".py")]
    outside = [f for f in python if "/torch/" not in f["filename"]] or python
    return [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in outside[:depth]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", default="unipelt")
    parser.add_argument("--method", required=True)
    parser.add_argument("--shape", default="bert-base")
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    case = _case_module()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    result = case.measure({"peer": opts.peer, "method": opts.method, "shape": opts.shape, "device": "cuda",
                           "steps": 5, "warmup": 2, "compile": "reduce-overhead", "optimizer": "fused"})
    peak, alive = live_at_peak(torch.cuda.memory._snapshot()["device_traces"][0])
    rows = sorted(([e["size"], frames(e)] for e in alive), key=lambda r: -r[0])
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"peer": opts.peer, "method": opts.method, "shape": opts.shape,
                                    "device": torch.cuda.get_device_name(), "peak_mb_measured": result["peak_mb"],
                                    "peak_mb_traced": peak / 2**20, "live": rows}) + "\n")
    print(f"{opts.peer} {opts.method}: peak {result['peak_mb']:.2f} MB measured with the history on, "
          f"{peak / 2**20:.2f} MB traced, {len(rows)} blocks alive at the traced peak")


if __name__ == "__main__":
    main()

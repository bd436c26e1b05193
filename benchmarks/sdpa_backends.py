"""GPU time of one attention call, forward and backward, per SDPA backend, at the shapes prefix and prompt tuning give.

BERT-base's attention is 32 x 12 heads x 128 queries and keys of size 64. A prefix of l vectors adds l keys and
values (128 + 10 for prefix and UniPELT, + 30 for MAM); prompt tuning adds tokens, so queries and keys both
grow (148 for 20 prompt tokens). For each shape and backend (``default``: what PyTorch picks): the GPU busy time
of ``scaled_dot_product_attention`` and its backward (torch profiler, per call, bf16), and the largest error of
the output and gradients relative to the default backend's. A backend that does not take the shape is
reported with its error message.

    python benchmarks/sdpa_backends.py --out sdpa.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unipelt.bench import case

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = [(128, 128), (128, 138), (128, 158), (138, 138), (148, 148)]  # (queries, keys)


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    out = F.scaled_dot_product_attention(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


def measure(batch: int, heads: int, head_dim: int, shapes: list[tuple[int, int]], steps: int) -> list[dict[str, Any]]:
    rows = []
    for queries, keys in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for n in (queries, keys, keys))
        grad = torch.randn(batch, heads, queries, head_dim, device="cuda", dtype=torch.bfloat16)
        reference = None
        for name, backend in BACKENDS.items():
            row: dict[str, Any] = {"queries": queries, "keys": keys, "backend": name}
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    result = _call(q, k, v, grad)
                    for _ in range(5):
                        _call(q, k, v, grad)
                    profile = case.kernel_profile(functools.partial(_call, q, k, v, grad), steps, top=8)
            except RuntimeError as error:  # no kernel of this backend takes the shape
                row["error"] = str(error).splitlines()[0][:200]
            else:
                reference = reference or result
                row |= {"us": profile["gpu_busy_ms"] * 1000, "kernels": profile["top_kernels"],
                        "err_vs_default": max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                              for a, b in zip(result, reference, strict=True))}
            rows.append(row)
            print(json.dumps({key: value for key, value in row.items() if key != "kernels"}), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| queries | keys | " + " | ".join(f"{b} us" for b in BACKENDS) + " |",
             "|---:|---:|" + "---:|" * len(BACKENDS)]
    for queries, keys in dict.fromkeys((r["queries"], r["keys"]) for r in rows):
        cells = [next((f"{r['us']:.1f}" if "us" in r else "-") for r in rows
                      if (r["queries"], r["keys"], r["backend"]) == (queries, keys, b)) for b in BACKENDS]
        lines.append(f"| {queries} | {keys} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--shapes", nargs="+", default=[f"{q}x{k}" for q, k in SHAPES],
                        help="QUERIESxKEYS, e.g. 128x138 for a prefix of 10")
    parser.add_argument("--steps", type=int, default=20, help="profiled calls per backend and shape")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU (the SDPA backends compared here run on CUDA)")
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    rows = measure(args.batch, args.heads, args.head_dim, shapes, args.steps)
    case.report_gpu_rows(rows, table(rows), args.out)


if __name__ == "__main__":
    main()

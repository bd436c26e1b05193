"""The fused bottleneck adapter (``unipelt.kernels.bottleneck``) against the unfused one, side by side.

For each bottleneck width, activation and gate (``--gates on``: UniPELT's per-token gate): one adapter with
its residual add, on ``--tokens`` x ``--width`` bf16 activations under autocast (float32 weights, as in
training; ``--weight-dtypes bfloat16``: weights built in bf16 per pass, as Compacter's), forward and backward:
the GPU time of its kernels and their number (torch profiler, per pass) for

- ``unfused``: the PyTorch function, eager;
- ``compiled``: the same through ``torch.compile`` (what a compiled model runs without the kernels);
- ``fused``: the Triton kernels, eager; and ``fused+compiled``: inside ``torch.compile``.

The JSON also holds each variant's kernels with their GPU time (``each_*``). Every variant's output and
gradients are compared with a float32 computation of the same inputs: the fused kernels must be at least
as close to it as autocast's unfused path (columns ``err_*``).

    python benchmarks/fused_bottleneck.py --out fused.json

``compare(..., device="cpu")`` runs the same variants in Triton's interpreter (float16) without timing
them: the tests' smoke run of this file.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import torch

from unipelt.bench import case
from unipelt.kernels import bottleneck as fused


def _half(device: str) -> torch.dtype:
    # bf16 as in training; on the CPU (Triton's interpreter, the tests' smoke run) float16, whose dots it gets right
    return torch.bfloat16 if device.startswith("cuda") else torch.float16


def _inputs(tokens: int, width: int, m: int, gated: bool, device: str,
            weight_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``weight_dtype``: float32 as a module's parameters under autocast; a half type as weights built per pass
    under autocast (Compacter's Kronecker products)."""
    torch.manual_seed(0)
    with torch.device(device):
        tensors = {"x": torch.randn(tokens, width, dtype=_half(device)),
                   "w_down": torch.randn(m, width) / width ** 0.5, "b_down": torch.randn(m) * 0.1,
                   "w_up": torch.randn(width, m) / m ** 0.5 * 0.1, "b_up": torch.randn(width) * 0.01,
                   "grad": torch.randn(tokens, width, dtype=_half(device))}
        if gated:
            tensors |= {"w_gate": torch.randn(1, width) / width ** 0.5, "b_gate": torch.randn(1) * 0.1}
        return {k: v if k in ("x", "grad") else v.to(weight_dtype) for k, v in tensors.items()}


def _unfused(x, w_down, b_down, w_up, b_up, act: str, scale: float, w_gate=None, b_gate=None) -> torch.Tensor:
    return fused.reference(x, None, w_down, b_down, w_up, b_up, act, scale, w_gate, b_gate)


def _fused(x, w_down, b_down, w_up, b_up, act: str, scale: float, w_gate=None, b_gate=None) -> torch.Tensor:
    return fused.bottleneck_add(x, None, w_down, b_down, w_up, b_up, act, scale, w_gate, b_gate)


def _pass(fn, tensors: dict[str, torch.Tensor], act: str, autocast: bool) -> list[torch.Tensor]:
    """Forward and backward; the output and the gradients of x and the weights (the gate's too, if any)."""
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items() if k != "grad"}
    device = tensors["x"].device.type
    with torch.autocast(device, dtype=_half(device), enabled=autocast):
        out = fn(**leaves, act=act, scale=1.0)
    out.backward(tensors["grad"].to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves.values()]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest error over the tensors, each relative to the largest value of its counterpart in ``want``."""
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want, strict=True))


def compare(tokens: int, width: int, bottlenecks: list[int], activations: list[str],
            steps: int, device: str = "cuda", gates: tuple[bool, ...] = (False,),
            weight_dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> list[dict[str, Any]]:
    """One row per (bottleneck, activation, gate, weights' dtype). On the CPU (Triton's interpreter) the errors
    only: no GPU time."""
    rows = []
    torch._dynamo.config.cache_size_limit = 64  # a recompile per width, activation and gate
    variants = {"unfused": _unfused, "compiled": torch.compile(_unfused, dynamic=False), "fused": _fused,
                "fused+compiled": torch.compile(_fused, dynamic=False)}
    for m, act, gated, weight_dtype in itertools.product(bottlenecks, activations, gates, weight_dtypes):
        tensors = _inputs(tokens, width, m, gated, device, weight_dtype)
        exact = _pass(_unfused, {k: v.float() if k != "grad" else v for k, v in tensors.items()}, act, False)
        row: dict[str, Any] = {"tokens": tokens, "width": width, "bottleneck": m, "activation": act,
                               "gated": gated, "weights": str(weight_dtype).removeprefix("torch.")}
        for name, fn in variants.items():
            row[f"err_{name}"] = relative_error(_pass(fn, tensors, act, True), exact)
            if device.startswith("cuda"):
                for _ in range(3):
                    _pass(fn, tensors, act, True)
                # GPU time, not wall time: one adapter's pass is far shorter than the host's work to launch it
                profile = case.kernel_profile(lambda fn=fn, t=tensors, a=act: _pass(fn, t, a, True), steps, top=40)
                row[f"us_{name}"] = profile["gpu_busy_ms"] * 1000
                row[f"kernels_{name}"] = profile["kernels_per_step"]
                # each kernel's time, to tell which of them a variant's difference sits in (JSON only)
                row[f"each_{name}"] = [[kernel, calls, ms * 1000] for kernel, calls, ms in profile["top_kernels"]]
        if device.startswith("cuda"):
            row["fused_vs_compiled"] = row["us_fused+compiled"] / row["us_compiled"]  # both compiled
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| m | act | gate | weights | GPU us (kernels): unfused | compiled | fused | fused, compiled | "
             "fused / unfused, compiled | error vs float32: compiled | fused |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[f'us_{v}']:.1f} ({r[f'kernels_{v}']:.0f})" if f"us_{v}" in r else "-"
                 for v in ("unfused", "compiled", "fused", "fused+compiled")]
        ratio = f"{r['fused_vs_compiled']:.2f}" if "fused_vs_compiled" in r else "-"
        lines.append(f"| {r['bottleneck']} | {r['activation']} | {'on' if r['gated'] else 'off'} | "
                     f"{r['weights']} | "
                     f"{' | '.join(cells)} | {ratio} | "
                     f"{r['err_compiled']:.1e} | {r['err_fused']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 128)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--bottlenecks", type=int, nargs="+", default=[24, 48, 64, 128])
    parser.add_argument("--activations", nargs="+", default=["silu", "relu", "gelu"])
    parser.add_argument("--gates", nargs="+", choices=["off", "on"], default=["off"],
                        help="on: with UniPELT's gate (a sigmoid per token of one more rank of x)")
    parser.add_argument("--weight-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
                        help="the weights' dtype: float32 (parameters under autocast) or bfloat16 (weights built "
                             "per pass under autocast, as Compacter's)")
    parser.add_argument("--steps", type=int, default=10, help="profiled passes per variant")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not fused.available(
            torch.empty(1, dtype=torch.bfloat16, device="cuda"), torch.bfloat16, 1, "relu"):
        raise SystemExit("needs a GPU with Triton (the fused kernels run there only)")
    rows = compare(args.tokens, args.width, args.bottlenecks, args.activations, args.steps,
                   gates=tuple(g == "on" for g in args.gates),
                   weight_dtypes=tuple(getattr(torch, name) for name in args.weight_dtypes))
    case.report_gpu_rows(rows, table(rows), args.out)


if __name__ == "__main__":
    main()

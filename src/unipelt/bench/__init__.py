"""Training speed and memory of every method, side by side with ``peft`` and ``adapters``.

``benchmarks/speed.py`` and ``unipelt bench`` run this. Each case (a library's method, the frozen
floor, full fine-tuning) runs in its own process through ``case.py`` so that peak memory is the
case's own; ``adapters`` cases run under a private ``transformers`` (``adapters`` pins
``transformers~=4.57``), installed with ``pip --target`` into a folder put first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

CASE_FILE = Path(__file__).with_name("case.py")
PEERS = ("peft", "adapters")
ADAPTERS_PINS = ("adapters==1.3.0", "transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2")
# what huggingface_hub 0.36 imports beyond this environment's packages (1.x moved to httpx)
HUB_036_NEEDS = {"requests": "requests", "charset_normalizer": "charset-normalizer", "idna": "idna",
                 "urllib3": "urllib3", "certifi": "certifi"}


def _case_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("unipelt_bench_case", CASE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


case = _case_module()
METHODS, SHAPES, applies = case.METHODS, case.SHAPES, case.applies


def ensure_adapters_env(target: Path, wheels: Path | None = None, log=print) -> Path | None:
    """A folder holding ``adapters`` and its pinned ``transformers`` (installed on first use), or None."""
    if (target / "adapters" / "__init__.py").exists():
        return target
    import importlib.util

    missing = [dist for module, dist in HUB_036_NEEDS.items() if importlib.util.find_spec(module) is None]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *ADAPTERS_PINS, *missing]
    if wheels is not None:
        cmd += ["--no-index", "--find-links", str(wheels)]
    log(f"installing {', '.join(ADAPTERS_PINS)} into {target}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"could not install adapters ({done.stderr.strip().splitlines()[-1:]}); its cases are left out")
        return None
    return target


def run_case(spec: dict[str, Any], pythonpath: Path | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run one case in a fresh process; its measurements, or ``{"error": ...}``."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        done = subprocess.run([sys.executable, str(CASE_FILE), json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": error_line(done.stderr)[:300]}
    return json.loads(lines[-1])


def error_line(stderr: str) -> str:
    """The line of a failed case's stderr that names its exception (``torch._dynamo`` follows it with
    hints about verbose logging), else the last line."""
    import re

    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()] or ["no output"]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Unsupported)\b", line)]
    return named[-1] if named else lines[-1]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def benchmark(shape: str, methods: list[str], peers: tuple[str, ...] = PEERS, device: str = "cpu",
              steps: int = 20, warmup: int = 5, adapters_env: Path | None = None, threads: int | None = None,
              rounds: int = 1, profile: bool = False, compile_mode: str | None = None,
              partial: Path | None = None, prewarm: int = 0, full: bool = True, optimizer: str = "foreach",
              compile_scope: str = "model", inductor: dict[str, Any] | None = None, top_kernels: int = 12,
              attention: str | None = None, log=print) -> dict[str, Any]:
    """Every method of ours and of each peer that has it, the floor and full fine-tuning, in one run.

    With ``rounds > 1`` every case runs that many times, round-robin over all cases, and the times
    are the medians over rounds: a burst of load on a shared machine then hits one round of a case,
    not all of one case. ``profile`` adds each case's GPU kernel count, busy time and top kernels;
    ``compile_mode`` runs every case (the floor too) through ``torch.compile`` in that mode. Each
    finished case is appended to ``partial`` (JSON lines) at once, so a run cut short keeps its cases.
    With ``compile_mode`` and ``prewarm > 0``, every case first runs one untimed step in that many
    processes at once: compiling (about a minute a case at BERT-base) then happens in parallel and fills
    ``torch.compile``'s on-disk caches, which the timed cases, one at a time as always, can load from
    (tracing and CUDA-graph capture they still do themselves). ``full=False`` leaves full fine-tuning out
    (a run that extends an earlier one with its reference already measured). ``optimizer`` is AdamW's
    implementation for every case: ``foreach`` (multi-tensor) or ``fused`` (one kernel per dtype).
    ``compile_scope="step"`` compiles each case's whole training step instead of its model: forward,
    backward through compiled autograd, and the optimizer. ``inductor`` sets ``torch._inductor.config``
    options (dotted names) in every case, the floor's too. ``top_kernels``: how many kernels (by GPU time)
    each profiled case lists. ``attention``: the models' attention implementation in every case (``sdpa``,
    ``eager``, ``flex_attention``; default: the model's own choice, SDPA).
    """
    inductor = inductor or {}
    family = SHAPES[shape]["family"]
    skipped = [m for m in methods if not applies(m, family)]
    if skipped:
        log(f"  not on a {family} model: {', '.join(skipped)}")
    methods = [m for m in methods if applies(m, family)]
    cases = [("floor", "-")] + [("floor", f"+{n}") for n in longer_floors(methods, family)]
    for method in methods:
        spec = METHODS[method]
        cases += [(p, method) for p in ("unipelt", *peers)
                  if p in spec and (p != "adapters" or adapters_env is not None)]
    if full:
        cases.append(("full", "-"))  # last: the reference a run cut short can best do without
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cases}
    # what every case of the run shares, the prewarm's untimed ones too
    run_spec = {"shape": shape, "device": device, "compile": compile_mode, "optimizer": optimizer,
                "compile_scope": compile_scope, "inductor": inductor, "attention": attention}
    if compile_mode and prewarm > 0:
        _prewarm(cases, prewarm, run_spec, adapters_env, log=log)
    for r in range(rounds):
        for peer, method in cases:
            spec = {"peer": peer, "method": method, **run_spec, "steps": steps, "warmup": warmup, "threads": threads,
                    "profile": profile, "top_kernels": top_kernels}
            result = run_case(spec, adapters_env if peer == "adapters" else None)
            runs[(peer, method)].append(result)
            if partial is not None:
                with partial.open("a") as f:
                    f.write(json.dumps({"peer": peer, "method": method, **result}) + "\n")
            shown = f"{result['train_ms']:.2f} ms" if "train_ms" in result else result["error"]
            if result.get("kernels_per_step") is not None:
                shown += f", {result['kernels_per_step']:.0f} kernels, GPU busy {result['gpu_busy_ms']:.2f} ms"
            log(f"  {f'round {r + 1} ' if rounds > 1 else ''}{peer:<9} {method:<11} {shown}")
    return summarise(runs, shape, methods, peers, device_name(device), steps=steps, warmup=warmup, rounds=rounds,
                     compile_mode=compile_mode, optimizer=optimizer, compile_scope=compile_scope, inductor=inductor,
                     attention=attention)


def longer_floors(methods: list[str], family: str) -> list[int]:
    """The extra positions at which a run also times the floor: each that one of ``methods`` adds to every
    layer's sequence (prompt tuning's 20 tokens). Such a method then also reads against the frozen model at
    its own length, which no module inserted into the layers can go below. Text families only: an image's
    patch count is fixed by its size."""
    if family == "vit":
        return []
    return sorted({METHODS[m]["tokens"] for m in methods if METHODS[m].get("tokens")})


def summarise(runs: dict[tuple[str, str], list[dict[str, Any]]], shape: str, methods: list[str],
              peers: tuple[str, ...], device: str, **run_options: Any) -> dict[str, Any]:
    """The benchmark's result (rows of ours vs each peer, the floor, full fine-tuning) from each case's runs."""
    results = {case: _median_of_rounds(found) for case, found in runs.items() if found}
    floor = results.get(("floor", "-"), {"error": "not run"})
    full = results.get(("full", "-"), {"error": "not run"})
    if "error" in floor:
        raise RuntimeError(f"the floor case failed: {floor['error']}")
    longer = {int(m[1:]): r for (p, m), r in results.items() if p == "floor" and m.startswith("+")}
    rows = []
    for method in methods:
        ours = results.get(("unipelt", method))
        for peer in [p for p in peers if (p, method) in results] or [None]:
            row = _row(method, peer, ours, results.get((peer, method)), floor, device)
            tokens = METHODS.get(method, {}).get("tokens")
            if tokens in longer:
                row.update(_against_longer_floor(row, longer[tokens], tokens))
            rows.append(row)
    extra = {"longer_floors": {str(n): r for n, r in sorted(longer.items())}} if longer else {}
    return {"shape": shape, "shape_spec": SHAPES[shape], "device": device, "floor": floor, "full": full,
            "rows": rows, **extra, **run_options}


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either was not measured."""
    return a / b if a and b else None


def _against_longer_floor(row: dict[str, Any], floor: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A row's figures against the floor at the method's own sequence length (``tokens`` positions more)."""
    if "error" in floor:
        return {"tokens_added": tokens, "longer_floor_error": floor["error"]}
    return {"tokens_added": tokens, "longer_floor_ms": floor["train_ms"],
            "ratio_vs_longer_floor": _ratio(row["ours_ms"], floor["train_ms"]),
            "longer_floor_ms_back_to_back": floor.get("back_to_back_ms"),
            "ratio_vs_longer_floor_back_to_back": _ratio(row["ours_ms_back_to_back"], floor.get("back_to_back_ms")),
            "longer_floor_gpu_busy_ms": floor.get("gpu_busy_ms"),
            "ratio_vs_longer_floor_gpu_busy": _ratio(row["ours_gpu_busy_ms"], floor.get("gpu_busy_ms"))}


def from_cases(path: Path, device: str) -> dict[str, Any]:
    """The result of a run cut short, from the cases it finished (its ``.cases.jsonl``)."""
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not cases:
        raise ValueError(f"{path} holds no finished case")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cases:
        runs.setdefault((c["peer"], c["method"]), []).append(c)
    methods = list(dict.fromkeys(c["method"] for c in cases if c["peer"] not in ("floor", "full")))
    peers = tuple(p for p in PEERS if any(c["peer"] == p for c in cases))
    first = cases[0]
    return summarise(runs, first["shape"], methods, peers, device, compile_mode=first.get("compile"),
                     optimizer=first.get("optimizer", "foreach"), compile_scope=first.get("compile_scope", "model"),
                     inductor=first.get("inductor") or {}, attention=first.get("attention"), partial=True)


def _prewarm(cases: list[tuple[str, str]], workers: int, run_spec: dict[str, Any], adapters_env: Path | None,
             log=print) -> None:
    """One untimed compiled step of every case, ``workers`` processes at a time (fills the compile caches).
    ``run_spec``: what the run's cases share (shape, device, compile mode and scope, optimizer, inductor options,
    attention implementation)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    def warm(peer_method: tuple[str, str]) -> str:
        peer, method = peer_method
        spec = {"peer": peer, "method": method, **run_spec, "steps": 1, "warmup": 1, "untimed": True}
        result = run_case(spec, adapters_env if peer == "adapters" else None)
        return f"{peer} {method}: {result.get('error', 'compiled')}"

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for line in pool.map(warm, cases):
            log(f"  prewarm {line}")
    log(f"  prewarm: {len(cases)} cases compiled in {time.perf_counter() - start:.0f} s, {workers} at a time")


def _median_of_rounds(found: list[dict[str, Any]]) -> dict[str, Any]:
    import statistics

    good = [r for r in found if "error" not in r]
    if not good:
        return found[0]
    merged = dict(good[0])
    for key in ("train_ms", "back_to_back_ms", "host_ms", "tokens_per_s", "infer_ms", "merged_infer_ms", "peak_mb",
                "peak_requested_mb"):
        values = [r[key] for r in good if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["train_ms_rounds"] = [r["train_ms"] for r in good]
    return merged


def _back_to_back(ours_ms: float | None, peer_ms: float | None, floor_ms: float | None) -> dict[str, Any]:
    """The same figures for steps run back to back (GPU): a training loop's throughput, host work hidden
    behind the GPU's where the GPU has work queued."""
    return {"ours_ms_back_to_back": ours_ms, "peer_ms_back_to_back": peer_ms, "floor_ms_back_to_back": floor_ms,
            "ratio_vs_floor_back_to_back": _ratio(ours_ms, floor_ms),
            "ratio_vs_peer_back_to_back": _ratio(ours_ms, peer_ms)}


def _row(method: str, peer: str | None, ours: dict | None, theirs: dict | None, floor: dict, device: str) -> dict:
    """One JSON row; ``device`` is the device's name."""
    def get(result: dict | None, key: str):
        return None if result is None or "error" in result else result.get(key)

    ours_ms, peer_ms, floor_ms = get(ours, "train_ms"), get(theirs, "train_ms"), floor["train_ms"]
    return {"method": method, "peer": peer, "device": device, "ours_ms": ours_ms, "peer_ms": peer_ms,
            "floor_ms": floor_ms,
            "ratio_vs_peer": _ratio(ours_ms, peer_ms), "ratio_vs_floor": _ratio(ours_ms, floor_ms),
            "ours_peak_mb": get(ours, "peak_mb"), "peer_peak_mb": get(theirs, "peak_mb"),
            "ours_peak_requested_mb": get(ours, "peak_requested_mb"),
            "peer_peak_requested_mb": get(theirs, "peak_requested_mb"),
            "ours_infer_ms": get(ours, "infer_ms"), "ours_merged_infer_ms": get(ours, "merged_infer_ms"),
            "peer_infer_ms": get(theirs, "infer_ms"), "peer_merged_infer_ms": get(theirs, "merged_infer_ms"),
            "bare_infer_ms": floor["infer_ms"],
            "ours_trainable": get(ours, "trainable"), "peer_trainable": get(theirs, "trainable"),
            "ours_ops": get(ours, "ops_per_step"), "peer_ops": get(theirs, "ops_per_step"),
            "ours_ms_rounds": get(ours, "train_ms_rounds"), "peer_ms_rounds": get(theirs, "train_ms_rounds"),
            **_back_to_back(get(ours, "back_to_back_ms"), get(theirs, "back_to_back_ms"), floor.get("back_to_back_ms")),
            "ours_host_ms": get(ours, "host_ms"), "peer_host_ms": get(theirs, "host_ms"),
            "floor_host_ms": floor.get("host_ms"),
            "floor_ops": floor.get("ops_per_step"),
            "ours_kernels": get(ours, "kernels_per_step"), "peer_kernels": get(theirs, "kernels_per_step"),
            "ours_gpu_busy_ms": get(ours, "gpu_busy_ms"), "peer_gpu_busy_ms": get(theirs, "gpu_busy_ms"),
            "ours_top_kernels": get(ours, "top_kernels"), "peer_top_kernels": get(theirs, "top_kernels"),
            "ours_cudagraph_skips": get(ours, "cudagraph_skip_reasons"),
            "peer_cudagraph_skips": get(theirs, "cudagraph_skip_reasons"),
            "ours_error": (ours or {}).get("error"), "peer_error": (theirs or {}).get("error")}


def format_table(result: dict[str, Any]) -> str:
    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    floor, full = result["floor"], result["full"]
    lines = [f"{result['shape']} on {result['device']}: floor {floor['train_ms']:.2f} ms/step, "
             f"{f(floor.get('ops_per_step'), 'd')} ops "
             f"(peak {floor['peak_mb']:.0f} MB, inference {f(floor['infer_ms'])} ms), full fine-tuning "
             f"{f(full.get('train_ms'))} ms ({f(full.get('train_ms') and full['train_ms'] / floor['train_ms'])}x)"
             + (f"; compiled ({result['compile_mode']}"
                + (", whole step" if result.get("compile_scope") == "step" else "") + ")"
                if result.get("compile_mode") else "")
             + f"; AdamW {result.get('optimizer', 'foreach')}"
             + "".join(f"; inductor {k}={v}" for k, v in (result.get("inductor") or {}).items())
             + (f"; attention {result['attention']}" if result.get("attention") else "")
             + (f"; PYTORCH_CUDA_ALLOC_CONF={floor['alloc_conf']}" if floor.get("alloc_conf") else ""),
             "",
             "| method | peer | ours ms | peer ms | x floor | x peer | ours MB | peer MB | infer ms (merged) | "
             "peer infer ms (merged) | ops/step ours / peer | trainable ours / peer |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['peer'] or '-'} | {f(r['ours_ms'])} | {f(r['peer_ms'])} | "
            f"{f(r['ratio_vs_floor'])} | {f(r['ratio_vs_peer'])} | {f(r['ours_peak_mb'], '.0f')} | "
            f"{f(r['peer_peak_mb'], '.0f')} | "
            f"{f(r['ours_infer_ms'])} ({f(r['ours_merged_infer_ms'])}) | {f(r['peer_infer_ms'])} "
            f"({f(r['peer_merged_infer_ms'])}) | {f(r['ours_ops'], 'd')} / {f(r['peer_ops'], 'd')} | "
            f"{f(r['ours_trainable'], ',')} / {f(r['peer_trainable'], ',')} |")
    if floor.get("kernels_per_step") is not None:
        lines += ["", f"GPU kernels per training step and GPU busy ms per step (torch profiler; floor "
                      f"{floor['kernels_per_step']:.0f} kernels, {floor['gpu_busy_ms']:.2f} ms busy):", "",
                  "| method | peer | kernels ours / peer | busy ms ours / peer | step ms ours / peer |",
                  "|---|---|---:|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['method']} | {r['peer'] or '-'} | {f(r['ours_kernels'], '.0f')} / "
                         f"{f(r['peer_kernels'], '.0f')} | {f(r['ours_gpu_busy_ms'])} / {f(r['peer_gpu_busy_ms'])} | "
                         f"{f(r['ours_ms'])} / {f(r['peer_ms'])} |")
    if floor.get("peak_requested_mb") is not None:
        lines += ["", "Peak GPU memory, MB: as the allocator's blocks count it (max_memory_allocated, the table "
                      f"above) and the tensors' own bytes (peak of requested bytes; floor "
                      f"{floor['peak_mb']:.2f} / {floor['peak_requested_mb']:.2f}):", "",
                  "| method | peer | allocated ours / peer | requested ours / peer |", "|---|---|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['method']} | {r['peer'] or '-'} | {f(r['ours_peak_mb'])} / {f(r['peer_peak_mb'])} | "
                         f"{f(r.get('ours_peak_requested_mb'))} / {f(r.get('peer_peak_requested_mb'))} |")
    if floor.get("back_to_back_ms") is not None:
        lines += ["", f"Steps back to back, no synchronisation between them (a training loop's throughput; floor "
                      f"{floor['back_to_back_ms']:.2f} ms/step, its host {f(floor.get('host_ms'))} ms/step; a step "
                      "whose host time reaches its step time is host-bound):", "",
                  "| method | peer | ours ms | peer ms | x floor | x peer | host ms ours / peer |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            lines.append(f"| {r['method']} | {r['peer'] or '-'} | {f(r['ours_ms_back_to_back'])} | "
                         f"{f(r['peer_ms_back_to_back'])} | {f(r['ratio_vs_floor_back_to_back'])} | "
                         f"{f(r['ratio_vs_peer_back_to_back'])} | {f(r.get('ours_host_ms'))} / "
                         f"{f(r.get('peer_host_ms'))} |")
    longer = list({r["method"]: r for r in reversed(result["rows"]) if "tokens_added" in r}.values())[::-1]
    if longer:  # one line per method (its rows against each peer share these figures)
        lines += ["", "Methods that lengthen every layer's sequence, against the frozen model at that length too "
                      "(no module inserted into the layers costs less than its own sequence's floor):", "",
                  "| method | tokens added | ours ms | floor ms (x) | longer floor ms (x) | back to back: x floor / "
                  "x longer floor | GPU busy: x floor / x longer floor |", "|---|---:|---:|---:|---:|---:|---:|"]
        busy = result["floor"].get("gpu_busy_ms")
        for r in longer:
            lines.append(
                f"| {r['method']} | {r['tokens_added']} | {f(r['ours_ms'])} | {f(r['floor_ms'])} "
                f"({f(r['ratio_vs_floor'])}) | {f(r.get('longer_floor_ms'))} ({f(r.get('ratio_vs_longer_floor'))}) | "
                f"{f(r['ratio_vs_floor_back_to_back'])} / {f(r.get('ratio_vs_longer_floor_back_to_back'))} | "
                f"{f(_ratio(r['ours_gpu_busy_ms'], busy))} / "
                f"{f(r.get('ratio_vs_longer_floor_gpu_busy'))} |")
    errors = [(r["method"], who, r[f"{who}_error"]) for r in result["rows"] for who in ("ours", "peer")
              if r[f"{who}_error"]]
    if errors:
        lines += ["", "Failed cases: " + "; ".join(f"{m} ({who}): {e}" for m, who, e in errors)]
    heard = {("floor", "floor"): result["floor"].get("cudagraph_skip_reasons")}
    for r in result["rows"]:  # each case once: ours repeats on a method's row against each peer
        heard.setdefault((r["method"], "ours"), r.get("ours_cudagraph_skips"))
        heard.setdefault((r["method"], r["peer"]), r.get("peer_cudagraph_skips"))
    skipped = [f"{method} ({who}): {' | '.join(reasons)}" for (method, who), reasons in heard.items() if reasons]
    if skipped:  # such a graph launches every kernel from the host, every step
        lines += ["", "Graphs run without CUDA graphs: " + "; ".join(skipped)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..train.loop import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="unipelt bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, choices=list(SHAPES),
                        help="default: bert-base on a GPU, bert-small on the CPU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case on the CPU")
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times, round-robin, "
                                                              "and report medians (for noisy machines)")
    parser.add_argument("--profile", action="store_true",
                        help="on a GPU: each case's kernels per step, GPU busy time and top kernels (torch profiler)")
    parser.add_argument("--top-kernels", type=int, default=12, metavar="N",
                        help="with --profile: list each case's N kernels that take the most GPU time")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES,
                        help="run every case, the floor too, through torch.compile in this mode")
    parser.add_argument("--compile-scope", default="model", choices=["model", "step"],
                        help="with --compile: the model (default), or the whole training step (forward, backward "
                             "through compiled autograd, optimizer)")
    parser.add_argument("--prewarm", type=int, default=0, metavar="N",
                        help="with --compile: compile every case first, N processes at a time, untimed (fills the "
                             "on-disk compile caches the timed cases then load from)")
    parser.add_argument("--optimizer", default="foreach", choices=["foreach", "fused"],
                        help="AdamW's implementation in every case (default foreach, the multi-tensor update)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="NAME=VALUE",
                        help="torch._inductor.config options for every case, e.g. combo_kernels=true "
                             "triton.cudagraph_trees=false (values read as JSON, else as text)")
    parser.add_argument("--attention", default=None, choices=["sdpa", "eager", "flex_attention"],
                        help="the models' attention implementation in every case (default: the model's own, SDPA)")
    parser.add_argument("--no-full", action="store_true",
                        help="leave full fine-tuning out (measured in an earlier run of the same shape)")
    parser.add_argument("--adapters-env", type=Path, default=Path(".bench/adapters-env"),
                        help="folder for adapters and its pinned transformers (installed if missing)")
    parser.add_argument("--adapters-wheels", type=Path, default=None, help="install them offline from these wheels")
    parser.add_argument("--out", type=Path, default=Path("out/speed/speed.json"), help="JSON; the table goes beside it")
    parser.add_argument("--from-cases", type=Path, default=None, metavar="CASES_JSONL",
                        help="run nothing: make the table and JSON of a run cut short from the cases it finished")
    parser.add_argument("--device-name", default=None, help="with --from-cases: the device the cases ran on")
    opts = parser.parse_args(argv)
    if opts.from_cases is not None:
        result = from_cases(opts.from_cases, opts.device_name or "unknown device")
        _write(result, opts.out)
        return 0

    import torch

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = opts.shape or ("bert-base" if device.startswith("cuda") else "bert-small")
    env = ensure_adapters_env(opts.adapters_env.resolve(), opts.adapters_wheels) if "adapters" in opts.peers else None
    print(f"{shape} on {device_name(device)}, {len(opts.methods)} methods", flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    partial = opts.out.with_suffix(".cases.jsonl")
    partial.unlink(missing_ok=True)
    result = benchmark(shape, opts.methods, tuple(opts.peers), device, opts.steps, opts.warmup, env, opts.threads,
                       opts.rounds, opts.profile, opts.compile, partial, opts.prewarm, not opts.no_full,
                       opts.optimizer, opts.compile_scope, parse_options(opts.inductor), opts.top_kernels,
                       opts.attention)
    _write(result, opts.out)
    return 0


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=true", "n=8", "s=text"]`` -> ``{"a.b": True, "n": 8, "s": "text"}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"inductor option {pair!r} is not NAME=VALUE (e.g. combo_kernels=true)")
        if text.lower() in ("true", "false"):  # Python's spelling too
            options[name] = text.lower() == "true"
            continue
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


def _write(result: dict[str, Any], out: Path) -> None:
    """Print the table; write the JSON to ``out`` and the table beside it (.md)."""
    table = format_table(result)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")

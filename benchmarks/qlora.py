"""QLoRA: step time and peak GPU memory of unipelt's LoRA against peft's, both on the same 4-bit nf4 base.

The GPU run (one H100 or H200, from the repository root, with ``pip install -e ".[test,quantized]"`` there:
unipelt, peft and bitsandbytes; a few minutes, most of them making, saving and loading the 1B model):

    python benchmarks/qlora.py --out benchmarks/results/qlora/qlora_llama1b.json

CPU smoke run (a tiny shape, two timed steps; ``tests/test_quantized.py::test_qlora_benchmark_smoke`` runs it; its
timings mean nothing, it checks that the whole benchmark runs):

    python benchmarks/qlora.py --smoke --out /tmp/qlora.json

What runs: a LLaMA of the LLaMA-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 32000), randomly initialised from its config with a fixed seed and saved once in bf16; each
implementation then runs in a process of its own (its own CUDA context and allocator), loading that folder with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bfloat16)`` (no double
quantization), the rest of the model in bf16. LoRA r=16, alpha=32, no dropout, on every linear projection of the
layers (q, k, v, o, gate, up, down; not ``lm_head``): unipelt ``targets=("all-linear",)``, peft
``target_modules="all-linear"``; the adapters in float32 (both libraries' default on a bf16 base). A step is
forward, the causal-LM loss, backward, AdamW (lr 1e-4, ``fused`` on the GPU) and ``zero_grad``, under
``torch.autocast(bfloat16)``, on a batch of 4 x 512 random tokens; the step time is the median of ``--steps``
steps after ``--warmup`` untimed ones (CUDA-synchronised). Peak memory: ``torch.cuda.max_memory_allocated`` over
the whole run (the quantized model, activations, gradients and optimizer states), and the model's own size after
loading. ``loss0``, the first step's loss, is the same function in both (B = 0 at init: the base model's loss), a
check that both ran the same model and batch. Neither uses gradient checkpointing or
``prepare_model_for_kbit_training``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ("unipelt", "peft")
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048)
SMOKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=128, max_position_embeddings=64)


def save_base(folder: Path, shape: dict[str, int], seed: int) -> None:
    """The random-init LLaMA of ``shape``, saved in bf16: both workers load the same weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**shape, pad_token_id=0, use_cache=False)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def worker(impl: str, folder: str, batch: int, seq: int, r: int, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """Load the 4-bit base, attach LoRA with ``impl``, time the training steps; one JSON-able row."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    import transformers
    from transformers import BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                          device_map={"": 0} if cuda else "cpu")
    model.config.use_cache = False
    model_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    torch.manual_seed(seed + 1)  # the LoRA factors' init
    if impl == "unipelt":
        import unipelt

        unipelt.attach(model, {"method": "lora", "r": r, "alpha": 2 * r, "targets": ["all-linear"]})
        version = unipelt.__version__
    else:
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0, bias="none",
                                 task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
        version = peft.__version__
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=gen).to(device)
    times, losses = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss.detach()))
    import bitsandbytes

    row = {
        "impl": impl, "version": version, "step_ms": statistics.median(times), "step_ms_all": times,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "model_mb": model_mb,
        "trainable": trainable, "loss0": losses[0], "loss_last": losses[-1],
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
    }
    if not cuda:  # no allocator statistics on the CPU: the process's peak resident size instead
        import resource

        row["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'impl':<8} {'step ms':>9} {'peak MiB':>9} {'model MiB':>9} {'trainable':>11} {'loss0':>8}",
             "-" * 60]
    for row in rows:
        peak = f"{row['peak_mb']:.0f}" if row["peak_mb"] is not None else "-"
        model = f"{row['model_mb']:.0f}" if row["model_mb"] is not None else "-"
        lines.append(f"{row['impl']:<8} {row['step_ms']:>9.2f} {peak:>9} {model:>9} {row['trainable']:>11,} "
                     f"{row['loss0']:>8.4f}")
    by = {row["impl"]: row for row in rows}
    if set(IMPLEMENTATIONS) <= set(by):
        ours, theirs = by["unipelt"], by["peft"]
        ratio = f"unipelt / peft: step time {ours['step_ms'] / theirs['step_ms']:.3f}x"
        if ours["peak_mb"] and theirs["peak_mb"]:
            ratio += f", peak memory {ours['peak_mb'] / theirs['peak_mb']:.3f}x"
        lines.append(ratio)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on whatever device there is (CPU test)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4; smoke 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512; smoke 16)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", action="append", choices=IMPLEMENTATIONS, help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows and settings here as JSON")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke = args.smoke
    steps = args.steps or (2 if smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    batch = args.batch or (2 if smoke else 4)
    seq = args.seq or (16 if smoke else 512)
    if args.worker:
        row = worker(args.worker, args.model_dir, batch, seq, args.r, steps, warmup, args.seed)
        print("ROW " + json.dumps(row), flush=True)
        return row
    shape = SMOKE if smoke else LLAMA_1B
    rows = []
    with tempfile.TemporaryDirectory(prefix="unipelt-qlora-") as folder:
        save_base(Path(folder), shape, args.seed)  # on the CPU: the parent never touches the GPU
        for impl in args.impl or IMPLEMENTATIONS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--model-dir", folder,
                   "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch), "--seq", str(seq),
                   "--r", str(args.r), "--seed", str(args.seed)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or not found:
                raise RuntimeError(f"{impl} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            rows.append(json.loads(found[-1]))
    result = {"shape": shape, "smoke": smoke, "batch": batch, "seq": seq, "r": args.r, "alpha": 2 * args.r,
              "steps": steps, "warmup": warmup, "quantization": "bitsandbytes 4-bit nf4, bf16 compute",
              "rows": rows}
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

"""The prefix as its own score block against attention over the concatenated keys, on one device.

    python benchmarks/prefix_attention_check.py --out benchmarks/results/speed/prefix_attention_check.json

For BERT-base's attention shape (batch 32, 12 heads, 128 tokens, head size 64) and prefixes of 10 and
30 keys: the largest differences of output and gradients (bf16 on a GPU, float32 on the CPU), without a
mask (cuDNN's kernel on a GPU) and with a padding mask (the memory-efficient kernel), eager and under
``torch.compile``; and forward+backward milliseconds (CUDA events, median) of the attention alone:
no prefix, prefix concatenated, prefix as a score block.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from unipelt.prefix_attention import prefix_attention


def concatenated(q, k, v, pk, pv, mask):
    wide = None if mask is None else F.pad(mask, (pk.shape[2], 0), value=True)
    return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=wide)


def bare(q, k, v, pk, pv, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def tensors(device, dtype, length, masked, batch=32, heads=12, seq=128, dim=64):
    g = torch.Generator(device=device).manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

    q, k, v = t(batch, heads, seq, dim), t(batch, heads, seq, dim), t(batch, heads, seq, dim)
    pk, pv = t(batch, heads, length, dim), t(batch, heads, length, dim)
    mask = None
    if masked:
        keep = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device=device)
        keep[::2, ..., seq // 2:] = False  # every other row padded to half length
        mask = keep.expand(batch, 1, seq, seq)
    return q, k, v, pk, pv, mask


def errors(fn, ref, args) -> dict[str, float]:
    grad = torch.randn_like(args[0])
    out, r = fn(*args), ref(*args)
    got = torch.autograd.grad(out, args[:5], grad)
    want = torch.autograd.grad(r, args[:5], grad)
    rel = {name: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
           for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv"), got, want, strict=True)}
    return {"out": ((out.float() - r.float()).abs().max() / r.float().abs().max()).item(), **rel}


def timed_ms(fn, args, cuda: bool, steps: int = 50) -> float:
    grad = torch.randn_like(args[0])
    times = []
    for i in range(steps + 10):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        torch.autograd.grad(fn(*args), args[:5], grad, allow_unused=True)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= 10:
                times.append(start.elapsed_time(end))
    return statistics.median(times) if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/prefix_attention_check.json"))
    opts = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    rows = []
    for length in (10, 30):
        for masked in (False, True):
            args = tensors(device, dtype, length, masked)
            row = {"prefix": length, "mask": masked, "eager": errors(prefix_attention, concatenated, args)}
            torch._dynamo.reset()
            row["compiled"] = errors(torch.compile(prefix_attention), concatenated, args)
            if cuda:
                row["ms"] = {name: timed_ms(fn, args, cuda) for name, fn in
                             (("no_prefix", bare), ("concatenated", concatenated), ("score_block", prefix_attention))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype), "rows": rows}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        worst = max(max(r["eager"].values()), max(r["compiled"].values()))
        ms = r.get("ms", {})
        print(f"prefix {r['prefix']:>2} mask {r['mask']!s:<5} worst rel. difference {worst:.2e}  "
              + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))


if __name__ == "__main__":
    main()

"""Does a method compute the same function, with the same gradients, under every attention implementation?

Before timing one implementation against another (``unipelt bench --attention``), check that they train
the same model. For each method: the same random base and the same perturbed delta weights under each
implementation, one forward and backward pass on a batch whose last row is right-padded, eagerly and
(``--compile``) through ``torch.compile``. Reported against the first implementation, run eagerly: the
largest difference of the last hidden state, and of the trainable tensors' gradients: the norm of the
difference over the norm, all tensors together, and the worst tensor's ``max |g - g_ref| / max |g_ref|``.

    python benchmarks/attention_check.py                        # llama-tiny on the CPU: eager and sdpa
    python benchmarks/attention_check.py --device cuda --attention sdpa flex_attention --compile \\
        --methods prefix unipelt --out check.json

FlexAttention has no backward on the CPU; there the check is forward only (``gradient`` empty).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from unipelt.bench import case


def _run(shape: dict[str, Any], method: str, attention: str, device: str, compiled: bool,
         backward: bool, dtype: torch.dtype | str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    autocast = dtype == "bf16-autocast"  # float32 weights, bf16 activations: as the benchmark trains
    with torch.device(device):
        model = case.build_base(shape, attention)
    model = case.attach("unipelt", method, model, shape["family"]).to(device, torch.float32 if autocast else dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # deltas start at zero (LoRA's B, adapters' up projections): move every one
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=generator) * 0.1).to(p.device, p.dtype))
    ids = case.random_batch(shape).to(device)
    mask = torch.ones_like(ids)
    mask[-1, -max(1, ids.shape[1] // 4):] = 0
    forward = torch.compile(model) if compiled else model
    with torch.set_grad_enabled(backward), torch.autocast(device.split(":")[0], torch.bfloat16, enabled=autocast):
        hidden = case.hidden(forward(input_ids=ids, attention_mask=mask)).double()
    if not backward:
        return hidden.detach(), {}
    # a fixed random direction: the mean square of a LayerNorm's output (gain 1, bias 0) is constant, so
    # its gradients would be rounding noise (BERT's eps is 1e-12), and any two implementations would differ
    direction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (hidden * mask[..., None] * direction.to(hidden.device)).sum().div(mask.sum()).backward()
    return hidden.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check(shape_name: str, methods: list[str], attentions: list[str], device: str, compiled: bool,
          dtype: torch.dtype | str = torch.float32, seq: int | None = None) -> list[dict]:
    shape = {**case.SHAPES[shape_name], **({"seq": seq} if seq else {})}
    rows = []
    for method in methods:
        backward = not (device == "cpu" and "flex_attention" in attentions)
        ref_hidden, ref_grads = _run(shape, method, attentions[0], device, False, backward, dtype)
        for attention in attentions:
            for mode in ("eager", "compiled") if compiled else ("eager",):
                hidden, grads = _run(shape, method, attention, device, mode == "compiled", backward, dtype)
                if grads.keys() != ref_grads.keys():
                    raise AssertionError(f"{method} under {attention}: other tensors got gradients")
                worst = max((((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30)).item(), n)
                            for n, g in grads.items()) if grads else (None, None)
                norm = (sum((g - ref_grads[n]).double().pow(2).sum() for n, g in grads.items())
                        / sum(g.double().pow(2).sum() for g in ref_grads.values())).sqrt().item() if grads else None
                rows.append({"method": method, "attention": attention, "mode": mode,
                             "dtype": str(dtype).removeprefix("torch."),
                             "hidden_max_diff": (hidden - ref_hidden).abs().max().item(),
                             "hidden_max": ref_hidden.abs().max().item(), "gradient_rel_norm_diff": norm,
                             "gradient_max_rel_diff": worst[0], "worst_tensor": worst[1], "tensors": len(grads)})
    return rows


def table(rows: list[dict], reference: str) -> str:
    lines = [f"against {reference}, eager", "",
             "| method | attention | mode | max hidden diff (max hidden) | gradients: norm of diff / norm "
             "| worst tensor: max diff / max | tensors |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        norm = "-" if r["gradient_rel_norm_diff"] is None else f"{r['gradient_rel_norm_diff']:.2e}"
        grad = "-" if r["gradient_max_rel_diff"] is None else f"{r['gradient_max_rel_diff']:.2e} ({r['worst_tensor']})"
        lines.append(f"| {r['method']} | {r['attention']} | {r['mode']} | {r['hidden_max_diff']:.2e} "
                     f"({r['hidden_max']:.2f}) | {norm} | {grad} | {r['tensors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-tiny", choices=sorted(case.SHAPES))
    parser.add_argument("--methods", nargs="+", default=["prefix", "unipelt"])
    parser.add_argument("--attention", nargs="+", default=["sdpa", "eager"],
                        choices=["sdpa", "eager", "flex_attention"], help="the first is the reference")
    parser.add_argument("--seq", type=int, help="tokens per row instead of the shape's (compiled FlexAttention in "
                        "torch 2.11 computes wrong outputs below its 128-token block even without a prefix)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also run each implementation through torch.compile")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bf16-autocast"],
                        help="the model's weights and activations (float64: not FlexAttention's compiled CPU form; "
                             "bf16-autocast: float32 weights under bf16 autocast, as the benchmark trains)")
    parser.add_argument("--out", help="JSON of the rows")
    args = parser.parse_args(argv)
    dtype = args.dtype if args.dtype == "bf16-autocast" else getattr(torch, args.dtype)
    rows = check(args.shape, args.methods, args.attention, args.device, args.compile, dtype, args.seq)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.shape} ({args.seq or case.SHAPES[args.shape]['seq']} tokens) on {device}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(table(rows, args.attention[0]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "seq": args.seq, "device": device, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

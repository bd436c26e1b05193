"""BERT-base with its adapters fused and unfused, on a GPU: the same function, one compiled graph.

For each method: attach it to the random BERT-base of the speed benchmark, move its delta away from zero,
and compare under bf16 autocast the final states and every trainable gradient (along one fixed random
direction) of the fused and the unfused adapters, eager and compiled. The fused-unfused distance should
be of the size of compiled-unfused against eager-unfused (both are bf16 rounding). Prints a JSON line
per method (its findings: docs/findings.md).

    python benchmarks/fused_model_check.py houlsby compacter
"""

from __future__ import annotations

import json
import sys

import torch
from fused_bottleneck import relative_error  # beside this file

from unipelt.bench import case
from unipelt.kernels import bottleneck as fused


def check(method: str) -> dict:
    shape = case.SHAPES["bert-base"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = case.attach("unipelt", method, case.build_base(shape), "bert").cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    inputs = case.step_inputs("unipelt", model, case.random_batch(shape).cuda())
    params = [p for n, p in model.named_parameters() if p.requires_grad and "pooler" not in n]
    direction = case.loss_direction(model, inputs)
    calls = {"n": 0}
    original = fused.bottleneck_add

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    def run(m, enabled: bool) -> list[torch.Tensor]:
        fused.enabled = enabled
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = case.hidden(m(**inputs)).float()
        grads = torch.autograd.grad((out * direction.float()).sum(), params)
        return [out.detach()] + [g.float() for g in grads]

    fused.bottleneck_add = counted
    try:
        eager_unfused = run(model, False)
        unfused_calls = calls["n"]
        eager_fused = run(model, True)
        fused_calls = calls["n"] - unfused_calls
        compiled_fused = run(torch.compile(model), True)
        torch._dynamo.reset()
        compiled_unfused = run(torch.compile(model), False)
    finally:
        fused.bottleneck_add, fused.enabled = original, True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(**inputs)

    return {"method": method, "fused_calls": fused_calls, "unfused_calls": unfused_calls,
            "err_fused_vs_unfused": relative_error(eager_fused, eager_unfused),
            "err_compiled_fused_vs_compiled_unfused": relative_error(compiled_fused, compiled_unfused),
            "err_compiled_unfused_vs_eager_unfused": relative_error(compiled_unfused, eager_unfused),
            "graphs": explained.graph_count, "breaks": explained.graph_break_count}


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU (the fused kernels run there)")
    for name in sys.argv[1:]:
        print(json.dumps(check(name)), flush=True)

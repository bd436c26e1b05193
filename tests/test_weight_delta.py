"""Weight deltas trained inside the projection's own GEMM (``Installer.add_weight_delta``).

KronA, KAdaptation and LoRA with ``fold=True`` compute ``x (W + Delta W)^T + b`` instead of
``output + x Delta W^T``: the same function and the same gradients, with the output form kept where
folding would change the function (a module whose output another method hooked first) or cannot act
per row (multi-task serving).
"""

from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import build, inputs, perturb_
from unipelt.core import deltas

CONFIGS = {"krona": {"method": "krona", "a_out": 4, "a_in": 4}, "kadaptation": {"method": "kadaptation", "n": 4},
           "lora_fold": {"method": "lora", "r": 4, "fold": True}}


def _attached(family: str, config: dict, unfolded: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build(family).to(dtype)
    if unfolded:  # a no-op hook on every linear map: nothing may fold in front of it
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                module.register_forward_hook(lambda module, args, output: None)
    torch.manual_seed(0)
    unipelt.attach(model, dict(config))
    _perturb(model, seed=3)  # A and v start at zero: away from the identity
    return model


def _perturb(model: torch.nn.Module, seed: int) -> None:
    perturb_(deltas(model).parameters(), seed, 0.2)


def _sites(model: torch.nn.Module) -> list[torch.nn.Module]:
    (method,) = deltas(model).values()
    return [proj.module for proj in method.sites.values()]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])  # gpt2: Conv1D, q and v slices of one fused c_attn
@pytest.mark.parametrize("name", list(CONFIGS))
def test_folded_delta_has_the_output_deltas_values_and_gradients(family: str, name: str) -> None:
    folded, unfolded = _attached(family, CONFIGS[name], False), _attached(family, CONFIGS[name], True)
    assert all("forward" in m.__dict__ for m in _sites(folded))
    assert not any("forward" in m.__dict__ for m in _sites(unfolded))
    batch = inputs(family)
    outputs = []
    for model in (folded, unfolded):
        out = model(**batch).logits  # eval mode (no dropout), gradients on
        out.square().mean().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    assert outputs[0][1].keys() == outputs[1][1].keys()
    for n, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_no_fold_in_front_of_a_method_that_hooked_the_output_first() -> None:
    """IA3 (attached first) scales W_v's output; KronA's delta on W_v then adds after that scaling, so it
    stays on the output there, and folds on W_q, which IA3 leaves alone."""
    model = build("bert")
    unipelt.attach(model, {"method": "ia3"})
    unipelt.attach(model, dict(CONFIGS["krona"]))
    krona = deltas(model)["krona"]
    _perturb(model, seed=4)
    folded = {key: "forward" in proj.module.__dict__ for key, proj in krona.sites.items()}
    assert folded == {key: key.endswith("_q") for key in krona.sites}
    batch = inputs("bert")
    with torch.no_grad():
        got = model(**batch).logits
        unipelt.merge(model)  # IA3 first, then KronA: what the merged weights hold, by definition
        assert not deltas(model)
        torch.testing.assert_close(model(**batch).logits, got, atol=1e-5, rtol=1e-5)


def test_a_compiled_folded_model_trains_like_the_eager_one() -> None:
    eager, compiled = _attached("bert", CONFIGS["krona"], False), _attached("bert", CONFIGS["krona"], False)
    batch = inputs("bert")
    torch._dynamo.reset()
    run = torch.compile(compiled, backend="aot_eager")
    for model in (eager, run):
        model(**batch).logits.square().mean().backward()
    torch._dynamo.reset()
    for (n, p), q in zip(deltas(eager).named_parameters(), deltas(compiled).parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_lora_fold_refuses_what_a_weight_cannot_hold() -> None:
    for extra in ({"gate": True}, {"dropout": 0.1}):
        with pytest.raises(unipelt.ConfigError, match="fold=True"):
            unipelt.attach(build("bert"), {"method": "lora", "fold": True, **extra})


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_bfloat16_model_trains_its_float32_delta_through_the_fold(family: str) -> None:
    """Without autocast the delta takes the weight's dtype for the GEMM; its own parameters stay float32 and
    get float32 gradients; the outputs match the output form's within bfloat16 rounding."""
    models = [_attached(family, CONFIGS["krona"], unfolded, torch.bfloat16) for unfolded in (False, True)]
    batch = inputs(family)
    outs = []
    for model in models:
        (method,) = deltas(model).values()
        assert all(p.dtype == torch.float32 for p in method.parameters())  # the core's choice on a bf16 model
        out = model(**batch).logits
        out.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
                   for p in method.parameters())
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)

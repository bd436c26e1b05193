"""The PHM family builds every layer's weight once per forward pass, batched: same function, same gradients."""

from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import build, inputs, perturb_
from unipelt.core import method_instances
from unipelt.methods.compacter import Compacter, batched_weights


def _attached(method: str, seed: int = 0):
    model = build("bert")
    unipelt.attach(model, {"method": method, "bottleneck": 8, "n": 4})  # phm_adapter's n = 12 does not divide 32
    perturb_([p for p in model.parameters() if p.requires_grad], seed, 0.1)  # so the up projections matter
    (method_object,) = [m for m in method_instances(model).values() if isinstance(m, Compacter)]
    return model, method_object


@pytest.mark.parametrize("method", ["compacter", "compacter++", "phm_adapter"])
def test_batched_weights_equal_each_layers_own(method: str) -> None:
    _, compacter = _attached(method)
    rules = getattr(compacter, "rules", None)
    layers = [getattr(b, part) for b in compacter.adapters.values() for part in ("down", "up")]
    for part in ("down", "up"):
        group = [getattr(b, part) for b in compacter.adapters.values()]
        for layer, w in zip(group, batched_weights(group, rules), strict=True):
            torch.testing.assert_close(w, layer.weight(rules), rtol=1e-6, atol=1e-7)
    assert len({layer.layout() for layer in layers}) == 2  # down and up: two batches for the whole model


@pytest.mark.parametrize("method", ["compacter", "phm_adapter"])
def test_per_pass_weights_give_the_per_call_function_and_gradients(method: str) -> None:
    model, compacter = _attached(method)
    batch = inputs("bert")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(**batch).logits
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    batched_out, batched_grads = run()
    context = compacter._context
    compacter._context = None  # no per-pass cache: every call builds its own weights
    per_call_out, per_call_grads = run()
    compacter._context = context
    torch.testing.assert_close(batched_out, per_call_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(batched_grads, per_call_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weights_are_rebuilt_every_pass() -> None:
    """A cached weight must not outlive its forward pass: after an update the next pass sees the new factors."""
    model, compacter = _attached("compacter")
    batch = inputs("bert")
    with torch.no_grad():
        before = model(**batch).logits
        next(iter(compacter.adapters.values())).up.t.add_(0.5)
        after = model(**batch).logits
    assert (after - before).abs().max() > 1e-4

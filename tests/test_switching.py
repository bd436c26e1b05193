"""Switching deltas on and off without detaching: ``unipelt.disabled`` and ``unipelt.set_active``.

Disabled, a model gives exactly the bare base model's outputs (a fresh ``build`` of the same seed, atol 0), its
head included; switched back on, exactly the attached model's. A chosen subset gives exactly what a model with
only those deltas attached gives. Under ``torch.compile`` every switch gives the eager outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unipelt
from conftest import build, inputs, logits, perturb_

EXACT = {"atol": 0, "rtol": 0}
# every kind of hook: output hooks and a folded GEMM (LoRA), input hooks (IA3's FFN), extra attention keys
# (prefix), the model-level call rewrite (prompt); on T5 the encoder's own pre-hook too
CONFIGS = [{"method": "lora", "r": 4}, "ia3", {"method": "prefix", "length": 3}, {"method": "prompt", "length": 2}]


def attached(family: str, configs=CONFIGS, head: bool = True) -> nn.Module:
    model = build(family)
    for i, config in enumerate(configs):
        torch.manual_seed(i)
        unipelt.attach(model, config)
    params = list(model.unipelt_deltas.parameters())
    if head and hasattr(model, "classifier"):
        params += list(model.classifier.parameters())
    perturb_(params, 7, 0.1)
    return model


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_disabled_is_the_bare_model_and_back(family: str) -> None:
    model = attached(family)
    batch = inputs(family)
    out = logits(model, batch)
    bare = logits(build(family), batch)
    assert (out - bare).abs().max() > 1e-4
    with unipelt.disabled(model) as inside:
        assert inside is model and unipelt.active(model) == []
        torch.testing.assert_close(logits(model, batch), bare, **EXACT)
        with unipelt.disabled(model):  # nested: still bare
            torch.testing.assert_close(logits(model, batch), bare, **EXACT)
        torch.testing.assert_close(logits(model, batch), bare, **EXACT)
    assert unipelt.active(model) == list(model.unipelt_deltas)
    torch.testing.assert_close(logits(model, batch), out, **EXACT)


def test_disabled_keeps_the_trained_head_on_request() -> None:
    model = attached("bert")
    batch = inputs("bert")
    body = build("bert")
    body.classifier.load_state_dict(model.classifier.state_dict())
    trained = model.classifier.weight
    with unipelt.disabled(model, heads=False):
        torch.testing.assert_close(logits(model, batch), logits(body, batch), **EXACT)
    with unipelt.disabled(model):
        assert model.classifier.weight is not trained and not model.classifier.weight.requires_grad
    assert model.classifier.weight is trained and trained.requires_grad  # the optimizer's parameter, back


def only(family: str, keep: list[int], source: nn.Module) -> nn.Module:
    """A fresh model with only the deltas ``keep`` of ``CONFIGS`` attached, holding ``source``'s weights."""
    model = build(family)
    if hasattr(model, "classifier"):
        model.classifier.load_state_dict(source.classifier.state_dict())
    for i in keep:
        unipelt.attach(model, CONFIGS[i])
    for name, method in model.unipelt_deltas.items():
        method.load_state_dict(source.unipelt_deltas[name].state_dict())
    return model


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_subset_runs_as_if_only_it_were_attached(family: str) -> None:
    model = attached(family)
    names = list(model.unipelt_deltas)
    batch = inputs(family)
    out = logits(model, batch)
    for keep in ([1], [0, 3], [2], [0, 1, 2]):
        assert unipelt.set_active(model, [names[i] for i in keep]) == [names[i] for i in keep]
        torch.testing.assert_close(logits(model, batch), logits(only(family, keep, model), batch), **EXACT)
    unipelt.set_active(model, [])
    with unipelt.disabled(model, heads=False):
        bare_body = logits(model, batch)
    torch.testing.assert_close(logits(model, batch), bare_body, **EXACT)
    assert unipelt.set_active(model, None) == names
    torch.testing.assert_close(logits(model, batch), out, **EXACT)


def test_switched_off_deltas_are_frozen_and_get_no_gradient() -> None:
    model = attached("bert", configs=[{"method": "lora", "r": 4}, "ia3"])
    lora, ia3 = model.unipelt_deltas["lora"], model.unipelt_deltas["ia3"]
    lora.pairs[next(iter(lora.pairs))].A.weight.requires_grad_(False)  # the user's own choice, kept
    unipelt.set_active(model, "ia3")
    assert not any(p.requires_grad for p in lora.parameters())
    assert unipelt.trainable_parameters(model)["lora"] == 0
    model(**inputs("bert")).logits.sum().backward()
    assert all(p.grad is None for p in lora.parameters())
    assert all(p.grad is not None for p in ia3.parameters())
    unipelt.set_active(model, None)
    frozen = lora.pairs[next(iter(lora.pairs))].A.weight
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in lora.parameters() if p is not frozen)


def test_switching_and_the_rest_of_the_api(tmp_path: Path) -> None:
    model = attached("bert")
    names = list(model.unipelt_deltas)
    batch = inputs("bert")
    out = logits(model, batch)
    unipelt.set_active(model, names[:2])
    subset = logits(model, batch)
    with pytest.raises(unipelt.ConfigError, match="switched off"):
        unipelt.merge(model)
    with pytest.raises(unipelt.ConfigError, match="no attached delta named"):
        unipelt.set_active(model, ["nope"])
    twin = copy.deepcopy(model)  # a copy keeps the running set
    assert unipelt.active(twin) == names[:2]
    torch.testing.assert_close(logits(twin, batch), subset, **EXACT)
    unipelt.save(model, tmp_path / "all")  # every delta, on or off; load switches them all on
    reloaded = unipelt.load(build("bert"), tmp_path / "all")
    torch.testing.assert_close(logits(reloaded, batch), out, **EXACT)
    with unipelt.disabled(model):
        with pytest.raises(unipelt.ConfigError, match="inside unipelt.disabled"):
            unipelt.attach(model, "bitfit")
        with pytest.raises(unipelt.ConfigError, match="inside unipelt.disabled"):
            unipelt.set_active(model, None)
    torch.testing.assert_close(logits(model, batch), subset, **EXACT)
    with unipelt.disabled(model):
        unipelt.detach(model)  # detach inside the block: the base model, for good
    torch.testing.assert_close(logits(model, batch), logits(build("bert"), batch), **EXACT)
    assert unipelt.active(model) == [] and "unipelt_deltas" not in model._modules


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_switching_under_torch_compile(family: str) -> None:
    """Compiled, each switch gives the eager outputs (a recompile, never another set's graph)."""
    torch._dynamo.reset()
    model = attached(family)
    names = list(model.unipelt_deltas)
    batch = inputs(family)
    compiled = torch.compile(model, backend="aot_eager")

    def check(expected: torch.Tensor) -> None:
        with torch.no_grad():
            torch.testing.assert_close(compiled(**batch).logits, expected, atol=1e-6, rtol=0)

    out = logits(model, batch)
    check(out)
    with unipelt.disabled(model):
        check(logits(build(family), batch))
    check(out)
    unipelt.set_active(model, [names[0], names[2]])
    check(logits(model, batch))
    unipelt.set_active(model, names[3])
    check(logits(model, batch))
    unipelt.set_active(model, None)
    check(out)
    torch._dynamo.reset()

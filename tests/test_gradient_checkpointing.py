"""Every method trains under gradient checkpointing: the same loss and gradients as without it.

``model.gradient_checkpointing_enable()`` makes each layer recompute its forward in the backward pass
(``transformers``' ``GradientCheckpointingLayer``), with the reentrant implementation or without it. A
method whose hooks keep state across layers (a prefix MLP computed once per pass, a stashed input) must
give the recompute what the first forward had.
"""

from __future__ import annotations

import pytest
import torch

import unipelt
from conftest import FAMILIES, build, inputs
from test_invariants import HEADS, METHODS, _config, not_applicable, perturb

# an encoder, a decoder and an encoder-decoder: every placement of every method runs in one of them
CHECKPOINT_FAMILIES = ("bert", "llama", "t5")
# the catalogue methods test_invariants leaves to files of their own (ATTEMPT with zero sources: its mixture
# runs all the same)
MORE = {"rational": "rational", "poly_mu": {"method": "poly_mu", "skills": 3, "r": 2},
        "attempt": {"method": "attempt", "n_sources": 2, "length": 3}, "mam_glue": {"method": "mam_glue"}}
CASES = [pytest.param(f, m, r, id=f"{f}-{m}-{'reentrant' if r else 'plain'}")
         for f in CHECKPOINT_FAMILIES for m in [*METHODS, *MORE] for r in (False, True)
         if m in MORE or not_applicable(f, m) is None]


def _method_config(key: str):
    return MORE[key] if key in MORE else _config(key)


def _loss_and_grads(family: str, key: str, checkpointing: bool, reentrant: bool):
    model = build(family)
    torch.manual_seed(0)
    unipelt.attach(model, _method_config(key))
    perturb(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    batch = inputs(family)
    if reentrant:  # the reentrant form carries gradients only when an input of the layer requires grad
        model.enable_input_require_grads()
    torch.manual_seed(1)  # the same dropout masks both ways (checkpointing replays the RNG state)
    out = model(**batch).logits
    loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().mean()
    loss.backward()
    trainable = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in trainable.items() if not n.startswith(HEADS)), \
        [n for n, g in trainable.items() if g is None]
    return loss.detach(), trainable


@pytest.mark.parametrize(("family", "key", "reentrant"), CASES)
def test_gradient_checkpointing_gives_the_same_gradients(family: str, key: str, reentrant: bool) -> None:
    loss, grads = _loss_and_grads(family, key, checkpointing=False, reentrant=reentrant)
    loss_ckpt, grads_ckpt = _loss_and_grads(family, key, checkpointing=True, reentrant=reentrant)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_every_family_here_checkpoints_its_layers() -> None:
    for family in CHECKPOINT_FAMILIES:
        model = build(family)
        assert model.supports_gradient_checkpointing, family
    assert set(CHECKPOINT_FAMILIES) <= set(FAMILIES)

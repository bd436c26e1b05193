"""The prefix as a score block of its own (``unipelt.prefix_attention``) computes attention over the
concatenated keys: values and gradients, with and without masks, in eager and compiled models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import build, inputs
from unipelt import attention
from unipelt import prefix_attention as pa


def _qkv(dtype: torch.dtype, shared: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, n, l, d = 3, 4, 13, 5, 16

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = t(b, h, n, d), t(b, h, n, d), t(b, h, n, d)
    pk, pv = t(1 if shared else b, h, l, d), t(1 if shared else b, h, l, d)
    keep = torch.rand(b, 1, 1, n, generator=g) > 0.3
    keep[..., 0] = True
    return q, k, v, pk, pv, keep.expand(b, 1, n, n)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-row-prefix", "shared-prefix"])
def test_score_blocks_equal_attention_over_concatenated_keys(dtype, tol, mask, shared) -> None:
    q, k, v, pk0, pv0, keep = _qkv(dtype, shared)
    b, l = q.shape[0], pk0.shape[2]
    pk, pv = pk0.expand(b, -1, -1, -1), pv0.expand(b, -1, -1, -1)
    if mask is None:
        ours_mask = wide = None
    elif mask == "bool":
        ours_mask, wide = keep, F.pad(keep, (l, 0), value=True)
    else:
        ours_mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        wide = F.pad(ours_mask, (l, 0), value=0.0)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    ours = pa.prefix_attention(q, k, v, pk, pv, ours_mask, scale=0.3)
    ref = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=wide, scale=0.3)
    leaves = (q, k, v, pk0, pv0)
    for a, r in zip((ours, *torch.autograd.grad(ours, leaves, grad)),
                    (ref, *torch.autograd.grad(ref, leaves, grad)), strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert (a.float() - r.float()).abs().max() <= tol * r.float().abs().max()


def test_masked_keys_get_no_weight_and_the_prefix_stays_visible() -> None:
    q, k, v, pk, pv, _ = _qkv(torch.float32, shared=False)
    hidden = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
    hidden[..., 3:] = False  # queries see keys 0..2 and the prefix only
    out = pa.prefix_attention(q, k, v, pk, pv, hidden)
    changed_v = v.detach().clone()
    changed_v[:, :, 3:] += 100.0
    assert torch.allclose(out, pa.prefix_attention(q, k, changed_v, pk, pv, hidden), atol=1e-5)
    assert not torch.allclose(out, pa.prefix_attention(q, k, v, pk, pv + 1.0, hidden), atol=1e-3)


def test_applies_only_where_the_blocks_are_exact() -> None:
    q, k, *_ = _qkv(torch.float32, shared=False)
    assert pa.applies(q, k, None, 0.0, False, None)
    assert not pa.applies(q, k, None, 0.1, False, None)  # dropout: the kernel's mask is not reproducible here
    assert not pa.applies(q, k, None, 0.0, True, None)  # causal
    assert not pa.applies(q, k, None, 0.0, False, torch.zeros(1))  # T5's position bias
    assert not pa.applies(q, k[:, :2], None, 0.0, False, None)  # grouped keys (GQA)


def _forward_backward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**batch).logits
    out.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _perturbed(config: dict) -> torch.nn.Module:
    model = build("bert")
    model.config._attn_implementation = "sdpa"
    unipelt.attach(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("config", [
    {"method": "prefix", "reparam": False},
    {"method": "prefix", "gate": True},
    {"method": "mam"},
    {"method": "unipelt"},
    {"method": "composition", "methods": [{"method": "prefix", "length": 3}, {"method": "prefix", "length": 4,
                                                                              "reparam": False}]},
], ids=lambda c: c["method"] + ("-gate" if c.get("gate") else ""))
def test_models_train_the_same_with_and_without_score_blocks(config: dict, monkeypatch) -> None:
    calls = []
    real = pa._PrefixAttention.apply
    monkeypatch.setattr(pa._PrefixAttention, "apply", lambda *a: calls.append(1) or real(*a))
    batch = inputs("bert")  # padded: the last row's mask reaches the kernel
    model = _perturbed(config)
    out, grads = _forward_backward(model, batch)
    assert len(calls) == 2  # both layers took the score-block path
    monkeypatch.setattr(attention, "SCORE_BLOCKS", False)
    ref, ref_grads = _forward_backward(model, batch)
    assert len(calls) == 2
    assert torch.allclose(out, ref, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_training_with_attention_dropout_concatenates(monkeypatch) -> None:
    calls = []
    real = pa._PrefixAttention.apply
    monkeypatch.setattr(pa._PrefixAttention, "apply", lambda *a: calls.append(1) or real(*a))
    model = _perturbed({"method": "prefix"}).train()  # BERT's attention dropout is 0.1
    model(**inputs("bert"))
    assert calls == []
    model.eval()(**inputs("bert"))
    assert len(calls) == 2


def test_compiled_model_equals_eager() -> None:
    batch = inputs("bert")
    model = _perturbed({"method": "prefix", "gate": True})
    out, grads = _forward_backward(model, batch)
    torch._dynamo.reset()
    try:
        compiled_out, compiled_grads = _forward_backward(torch.compile(model), batch)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, compiled_out, atol=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, compiled_grads[name], atol=1e-5, rtol=1e-4), name

"""Compacter / Compacter++ / PHM-Adapter and SparseAdapter against their references' recipes (issue 26, 4 and 5).

Compacter: rabeehk/compacter ``seq2seq/configs/compacter.json``, ``hypercomplex/layers.py``, ``inits.py``;
SparseAdapter: Shwai-He/SparseAdapter ``petl/petl_factory.py``, ``pruners.py``, ``run_glue.sh``. Every expected
value below is computed here from the formula, not read from the code under test.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import unipelt
from conftest import build, inputs, logits, perturb_
from unipelt.core import attachment
from unipelt.methods.compacter import Compacter, PHMLinear
from unipelt.methods.sparse_adapter import SparseAdapter, snip_prune
from unipelt.train.loop import RunConfig, default_lr, prune_sparse_adapters


def _compacter(model: nn.Module) -> Compacter:
    (method,) = [m for m in model.unipelt_deltas.values() if isinstance(m, Compacter)]
    return method


def _sparse(model: nn.Module) -> SparseAdapter:
    return model.unipelt_deltas["sparse_adapter"]


def _norm_params(model: nn.Module) -> int:
    """Gains and biases of every LayerNorm / RMSNorm of the body (heads apart)."""
    heads = tuple(f"{n}." for n in attachment(model).model_map.head_modules) if attachment(model) else ()
    total = 0
    for name, m in model.named_modules():
        if name.startswith(heads) or name.startswith("unipelt_deltas"):
            continue
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm")):
            total += m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return total


def _bert(hidden: int, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                     intermediate_size=64, vocab_size=96, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _xavier_bound(rows: int, cols: int) -> float:
    return math.sqrt(2.0) * math.sqrt(6.0 / (rows + cols))


# ============================================================================================ Compacter


def test_reference_learning_rates() -> None:
    for name in ("compacter", "compacter++", "phm_adapter"):
        assert default_lr(name, unipelt.parse_config(name)) == 3e-3
    assert default_lr("sparse_adapter", unipelt.parse_config("sparse_adapter")) == 1e-4


def test_compacter_defaults() -> None:
    for name, n, placement in (("compacter", 4, "houlsby"), ("compacter++", 4, "pfeiffer"), ("phm_adapter", 12,
                                                                                              "houlsby")):
        c = unipelt.parse_config(name)
        assert (c.n, c.placement, c.train_layer_norms, c.cross_attention, c.bottleneck) == (n, placement, True, False,
                                                                                            None)
        assert c.width(768) == 24  # d / 32, divisible by 4 and 12


@pytest.mark.parametrize(("hidden", "method", "m"), [(256, "compacter", 8), (768, "compacter", 24),
                                                     (768, "phm_adapter", 24), (384, "phm_adapter", 12),
                                                     (32, "compacter", 4)])
def test_bottleneck_is_d_over_32(hidden: int, method: str, m: int) -> None:
    """m = d / 32 (rounded down to a multiple of n, at least n); PHM-Adapter's n = 12 (12 x 12 x 12 own rules)."""
    model = unipelt.attach(_bert(hidden, heads=4), method)
    compacter = _compacter(model)
    n = 12 if method == "phm_adapter" else 4
    assert compacter.bottleneck == m == max(n, hidden // 32 // n * n)
    for bottleneck in compacter.adapters.values():
        assert bottleneck.down.bias.numel() == m and bottleneck.up.bias.numel() == hidden
        if method == "phm_adapter":
            assert bottleneck.down.rules.shape == bottleneck.up.rules.shape == (12, 12, 12)
            assert bottleneck.down.B.shape == (12, m // 12, hidden // 12)


@pytest.mark.parametrize(("d_in", "d_out", "n", "rank"), [(768, 24, 4, 1), (24, 768, 4, 1), (768, 24, 12, None),
                                                          (24, 768, 12, None), (512, 64, 4, 3)])
def test_fast_factors_are_xavier_uniform_gain_sqrt2(d_in: int, d_out: int, n: int, rank: int | None) -> None:
    """Every slice U(-a, a), a = sqrt 2 sqrt(6 / (rows + cols)), for down and up projections alike (the up
    projection is not zero)."""
    torch.manual_seed(3)
    layer = PHMLinear(d_in, d_out, n, rank, own_rules=True)
    p, q = d_out // n, d_in // n
    factors = [(layer.B, p, q)] if rank is None else [(layer.s, p, rank), (layer.t, rank, q)]
    for tensor, rows, cols in factors:
        a = _xavier_bound(rows, cols)
        values = tensor.detach().reshape(-1)
        assert tensor.shape == (n, rows, cols)
        assert values.abs().max() <= a
        if values.numel() >= 200:  # U(-a, a): max |v| near a, E v^2 = a^2 / 3, mean 0
            assert values.abs().max() > 0.95 * a
            assert values.pow(2).mean().item() == pytest.approx(a * a / 3, rel=0.15)
            assert abs(values.mean().item()) < 0.1 * a
    assert not layer.bias.any()
    rules = layer.rules.detach().reshape(-1)  # PHM-Adapter's own rules: N(0, 0.01^2)
    assert rules.std().item() == pytest.approx(0.01, rel=0.25) and abs(rules.mean().item()) < 0.003


@pytest.mark.parametrize("method", ["compacter", "compacter++", "phm_adapter"])
def test_attached_init_scales(method: str) -> None:
    """On an attached model: shared rules N(0, 1e-4^2) (n = 8: 512 values), every factor of W_down and W_up
    within its Xavier bound, the pooled |v| / a of the up projections uniform on [0, 1] (mean 1/2)."""
    model = unipelt.attach(build("bert"), {"method": method, "n": 8, "bottleneck": 8})
    compacter = _compacter(model)
    if method != "phm_adapter":
        rules = compacter.rules.detach().reshape(-1)
        assert rules.numel() == 512
        assert rules.std().item() == pytest.approx(1e-4, rel=0.15) and abs(rules.mean().item()) < 2e-5
    for part in ("down", "up"):
        normalised = []
        for bottleneck in compacter.adapters.values():
            layer = getattr(bottleneck, part)
            for f in ([layer.B] if layer.B is not None else [layer.s, layer.t]):
                a = _xavier_bound(f.shape[1], f.shape[2])
                normalised.append(f.detach().reshape(-1).abs() / a)
        pooled = torch.cat(normalised)
        assert pooled.max() <= 1.0 and pooled.mean().item() == pytest.approx(0.5, abs=0.06), part


def test_init_lora_option_starts_exactly_at_the_base_model() -> None:
    batch = inputs("bert")
    base = logits(build("bert"), batch)
    model = unipelt.attach(build("bert"), {"method": "compacter", "bottleneck": 8, "init": "lora"})
    assert torch.equal(logits(model, batch), base)
    near = unipelt.attach(build("bert"), {"method": "compacter", "bottleneck": 8})
    diff = (logits(near, batch) - base).abs().max().item()
    assert 0 < diff < 1e-6  # the reference's init: W of order 1e-5, near the base model


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_no_adapter_after_cross_attention(family: str) -> None:
    model = unipelt.attach(build(family), {"method": "compacter", "bottleneck": 8})
    sites = list(_compacter(model).adapters)
    layers = attachment(model).model_map.layers
    assert not any("cross" in k for k in sites)
    assert sorted(sites) == sorted([f"{layer.key}_self_attn" for layer in layers] +
                                   [f"{layer.key}_ffn" for layer in layers])
    with_cross = unipelt.attach(build(family), {"method": "compacter", "bottleneck": 8, "cross_attention": True})
    decoder = [layer for layer in layers if len(layer.attentions) == 2]
    assert decoder and len(_compacter(with_cross).adapters) == len(sites) + len(decoder)


@pytest.mark.parametrize("family", ["bert", "t5", "llama", "bart"])
def test_layer_norms_train_and_counts_follow_the_formula(family: str) -> None:
    model = build(family)
    norms = _norm_params(model)
    unipelt.attach(model, {"method": "compacter", "bottleneck": 8})
    D, m, n = model.config.hidden_size if family != "t5" else model.config.d_model, 8, 4
    adapters = 2 * len(attachment(model).model_map.layers)  # after the self-attention and the FFN
    assert unipelt.trainable_parameters(model)["compacter"] == n ** 3 + adapters * 3 * (D + m) + norms
    compacter = _compacter(model)
    assert compacter.layer_norms is not None and sum(p.numel() for p in compacter.layer_norms.parameters()) == norms
    assert all(p.requires_grad for p in compacter.layer_norms.parameters())
    # a step moves the tuned gains; the base norms' own weights stay as they were
    base_norms = {k: m.weight.detach().clone() for k, m in compacter.layer_norms.norms.items()}
    gains = {k: g.detach().clone() for k, g in compacter.layer_norms.gains.items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**inputs(family)).logits
    out.float().square().mean().backward()
    assert all(g.grad is not None and g.grad.any() for g in compacter.layer_norms.gains.values())
    opt.step()
    assert all(not torch.equal(gains[k], g) for k, g in compacter.layer_norms.gains.items())
    assert all(torch.equal(base_norms[k], m.weight) for k, m in compacter.layer_norms.norms.items())
    off = unipelt.attach(build(family), {"method": "compacter", "bottleneck": 8, "train_layer_norms": False})
    assert unipelt.trainable_parameters(off)["compacter"] == n ** 3 + adapters * 3 * (D + m)


def test_phm_adapter_count_formula() -> None:
    model = _bert(384)
    norms = _norm_params(model)
    unipelt.attach(model, "phm_adapter")
    d, m, n = 384, 12, 12
    per_layer = lambda i, o: n ** 3 + o * i // n + o  # noqa: E731 (own rules, full factors, bias)
    adapters = 2  # one layer: self-attention and FFN
    assert unipelt.trainable_parameters(model)["compacter"] == adapters * (per_layer(d, m) + per_layer(m, d)) + norms


@pytest.mark.parametrize(("family", "method"), [("bert", "compacter"), ("t5", "compacter"), ("bart", "compacter++"),
                                                ("llama", "phm_adapter")])
def test_compacter_save_load_exact(family: str, method: str, tmp_path: Path) -> None:
    model = unipelt.attach(build(family), {"method": method, "bottleneck": 8, "n": 4})
    perturb_(model.unipelt_deltas.parameters(), 5, 0.1)  # the tuned norms too
    batch = inputs(family)
    expected = logits(model, batch)
    unipelt.save(model, tmp_path)
    loaded = unipelt.load(build(family), tmp_path)
    assert torch.equal(logits(loaded, batch), expected)
    for (k, a), (k2, b) in zip(model.unipelt_deltas.state_dict().items(), loaded.unipelt_deltas.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_compacter_is_not_mergeable() -> None:
    model = unipelt.attach(build("bert"), {"method": "compacter", "bottleneck": 8})
    assert not _compacter(model).mergeable()


# ========================================================================================= SparseAdapter


def _labelled(family: str, seed: int) -> dict[str, torch.Tensor]:
    batch = inputs(family, seed=seed)
    batch["labels"] = torch.randint(0, 3, (batch["input_ids"].shape[0],), generator=torch.Generator().manual_seed(seed))
    return batch


def test_sparse_adapter_defaults() -> None:
    c = unipelt.parse_config("sparse_adapter")
    assert (c.bottleneck, c.placement, c.sparsity, c.scope, c.layer_norm, c.dropout, c.resolved_init,
            c.activation) == (64, "houlsby", 0.4, "global", True, 0.1, "bert", "relu")


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_sparse_adapter_sites_init_and_count(family: str) -> None:
    """Houlsby (after every attention and the FFN), m = 64, W_down and W_up ~ N(0, 0.02^2), zero biases, a
    LayerNorm (1, 0) in each adapter; 2 d m + d + m + 2 d parameters per adapter."""
    model = unipelt.attach(build(family), "sparse_adapter")
    method = _sparse(model)
    layers = attachment(model).model_map.layers
    expected_sites = sum(len(layer.attentions) + 1 for layer in layers)
    assert len(method.adapters) == expected_sites
    assert {k.rsplit("_", 1)[-1] for k in method.adapters} == {"attn", "ffn"}
    d, m = layers[0].ffn_out.out_features, 64
    for part in ("down", "up"):
        w = torch.cat([getattr(b, part).weight.detach().reshape(-1) for b in method.adapters.values()])
        assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 0.002
        assert not any(getattr(b, part).bias.any() for b in method.adapters.values())
    for b in method.adapters.values():
        assert b.down.weight.shape == (m, d) and isinstance(b.norm, nn.LayerNorm) and b.norm.normalized_shape == (d,)
        assert torch.equal(b.norm.weight, torch.ones(d)) and not b.norm.bias.any()
    assert method.dropout == 0.1
    assert unipelt.trainable_parameters(model)["sparse_adapter"] == expected_sites * (2 * d * m + d + m + 2 * d)


def test_sparse_adapter_layer_norm_and_dropout_inside() -> None:
    """delta = W_up D(relu(W_down LN(x) + b_down)) + b_up, the residual un-normalised x; dropout 0.1 in training."""
    model = unipelt.attach(build("bert"), "sparse_adapter")
    method = _sparse(model)
    perturb_(method.parameters(), 2, 0.1)  # gains and biases of the LayerNorm away from (1, 0)
    installer = attachment(model).installers["sparse_adapter"]
    key = "layers0_ffn"
    b = method.adapters[key]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    normed = F.layer_norm(x, (32,), b.norm.weight, b.norm.bias, b.norm.eps)
    hidden = F.relu(F.linear(normed, b.down.weight, b.down.bias))
    method.eval()
    with torch.no_grad():
        plain = x + F.linear(hidden, b.up.weight, b.up.bias)
        torch.testing.assert_close(method._add_delta(installer, key, x, x), plain)
        method.train()
        torch.manual_seed(4)
        got = method._add_delta(installer, key, x, x)
        torch.manual_seed(4)
        expected = x + F.linear(F.dropout(hidden, 0.1, True), b.up.weight, b.up.bias)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, plain)


def _independent_global_masks(model: nn.Module, batches: list[dict], sparsity: float) -> dict[str, torch.Tensor]:
    """SNIP with one threshold, computed here: |dL/dw * w| (eval mode, masks all ones, gradients summed), the
    K-th largest score of all matrices as the threshold, K = floor((1 - s) N + 1/2)."""
    method = _sparse(model)
    layers = {f"{k}.{part}": getattr(b, part) for k, b in method.adapters.items() for part in ("down", "up")}
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch).loss.backward()
    scores = {k: (layer.weight.grad * layer.weight).abs().detach().double() for k, layer in layers.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = math.floor((1 - sparsity) * flat.numel() + 0.5)
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest
    model.zero_grad(set_to_none=True)
    return {k: s >= threshold for k, s in scores.items()}


def test_global_snip_threshold() -> None:
    """The matrices' scores have different scales: with one threshold their kept fractions differ (per-matrix
    pruning would keep 1 - s of each), the global kept fraction is 1 - s, and every mask is the independent
    one-threshold mask."""
    s = 0.4
    model = unipelt.attach(build("bert"), {"method": "sparse_adapter", "sparsity": s})
    method = _sparse(model)
    batches = [_labelled("bert", 1), _labelled("bert", 2)]
    expected = _independent_global_masks(model, batches, s)
    achieved = snip_prune(model, batches)
    layers = {f"{k}.{part}": getattr(b, part) for k, b in method.adapters.items() for part in ("down", "up")}
    kept = {k: int(layer.mask.sum()) for k, layer in layers.items()}
    total = sum(layer.mask.numel() for layer in layers.values())
    assert sum(kept.values()) == math.floor((1 - s) * total + 0.5)
    for k, layer in layers.items():
        assert torch.equal(layer.mask, expected[k]), k
        assert achieved[f"sparse_adapter.{k}"] == pytest.approx(1 - kept[k] / layer.mask.numel())
    density = {k: kept[k] / layers[k].mask.numel() for k in layers}
    assert len({round(v, 6) for v in density.values()}) > 2  # the per-matrix densities differ
    assert min(density.values()) < 1 - s - 0.05 and max(density.values()) > 1 - s + 0.05


def test_global_scope_with_a_zero_up_projection() -> None:
    """init="lora" (W_up = 0): the zero matrices are scored at their first step, still one threshold for all."""
    s = 0.4
    model = unipelt.attach(build("bert"), {"method": "sparse_adapter", "sparsity": s, "init": "lora"})
    snip_prune(model, [_labelled("bert", 1)])
    masks = [layer.mask for layer in _sparse(model).masked_layers().values()]
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == math.floor((1 - s) * total + 0.5)
    assert len({int(m.sum()) * 1.0 / m.numel() for m in masks}) > 1
    again = unipelt.attach(build("bert"), {"method": "sparse_adapter", "sparsity": s, "init": "lora"})
    snip_prune(again, [_labelled("bert", 1)])
    assert all(torch.equal(a, b.mask) for a, b in zip(masks, _sparse(again).masked_layers().values(), strict=True))


class _Feats:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def test_trainer_prunes_on_320_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    sparse_module = importlib.import_module("unipelt.methods.sparse_adapter")  # unipelt.methods is a function

    seen: list[list[dict]] = []
    monkeypatch.setattr(sparse_module, "snip_prune", lambda model, batches: seen.append(list(batches)))
    model = unipelt.attach(build("bert"), "sparse_adapter")
    for rows, batch_size in ((1000, 48), (1000, 16), (100, 16)):
        feats = _Feats([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor(i % 3)} for i in range(rows)])
        prune_sparse_adapters(model, feats, 0, RunConfig(task="sst2", batch_size=batch_size, seed=3))
        sizes = [b["labels"].shape[0] for b in seen[-1]]
        assert sum(sizes) == min(320, rows) and max(sizes) == batch_size


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sparse_save_load_exact_after_global_pruning(family: str, tmp_path: Path) -> None:
    model = unipelt.attach(build(family), "sparse_adapter")
    batch = inputs(family, seed=1)
    if family == "llama":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch = _labelled(family, 1)
    snip_prune(model, [batch])
    perturb_(_sparse(model).parameters(), 6, 0.05)
    expected = logits(model, inputs(family))
    unipelt.save(model, tmp_path)
    loaded = unipelt.load(build(family), tmp_path)
    assert torch.equal(logits(loaded, inputs(family)), expected)
    for (k, a), b in zip(_sparse(model).masked_layers().items(), _sparse(loaded).masked_layers().values(),
                         strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.masked_weight(), b.masked_weight()), k
    for k, b in _sparse(model).adapters.items():
        assert torch.equal(b.norm.weight, _sparse(loaded).adapters[k].norm.weight)
    assert not _sparse(model).mergeable()

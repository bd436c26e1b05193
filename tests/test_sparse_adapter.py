"""SparseAdapter: SNIP pruning at init, fixed masks, Large-Sparse, sparse saved deltas.

Counts and rules are those of the module docstring of ``unipelt.methods.sparse_adapter``, recomputed here
from the model's dimensions.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import unipelt
from conftest import FAMILIES, build, inputs, logits, perturb_
from unipelt.core import attachment
from unipelt.methods.sparse_adapter import MaskedLinear, SparseAdapter, snip_prune

FAMS = ["bert", "gpt2", "llama"]
M = 16
VARIANTS = {
    "plain": {},
    "gated_parallel": {"gate": True, "parallel": True, "scaling": 4.0},
    "houlsby_large_sparse": {"placement": "houlsby", "sparsity": 0.8, "large_sparse": True},
}


# the per-matrix scope, zero W_up and Pfeiffer adapter without LayerNorm or dropout (options; the reference's
# defaults are tested in test_catalogue_fidelity_compacter_sparse.py)
LOCAL = {"scope": "local", "init": "lora", "placement": "pfeiffer", "layer_norm": False, "dropout": 0.0,
         "sparsity": 0.5}


def config(**kw) -> dict:
    return {"method": "sparse_adapter", "bottleneck": M, **LOCAL, **kw}


def attached(family: str, seed: int = 0, **kw) -> nn.Module:
    model = build(family)
    torch.manual_seed(seed)
    return unipelt.attach(model, config(**kw))


def labelled(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    batch = inputs(family, seed=seed)
    if FAMILIES[family].name == "llama":  # causal LM: next-token labels, padding ignored
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.randint(0, 3, (batch["input_ids"].shape[0],),
                                        generator=torch.Generator().manual_seed(seed))
    return batch


def method(model: nn.Module) -> SparseAdapter:
    return model.unipelt_deltas["sparse_adapter"]


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.mask.clone() for k, v in method(model).masked_layers().items()}


def width(model: nn.Module) -> int:
    return attachment(model).model_map.layers[0].ffn_out.out_features


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 7) -> None:
    perturb_(model.unipelt_deltas.parameters(), seed, 0.1, draw_in_dtype=True)


def batches(family: str, seeds=(1, 2)) -> list[dict[str, torch.Tensor]]:
    return [labelled(family, s) for s in seeds]


# ------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", FAMS)
def test_identity_at_init_before_and_after_pruning(family: str, variant: str) -> None:
    batch = inputs(family)
    ref = logits(build(family), batch)
    model = attached(family, **VARIANTS[variant])
    assert all(bool(m.all()) for m in masks(model).values())  # dense until pruned
    assert torch.equal(logits(model, batch), ref)
    snip_prune(model, batches(family))
    assert not any(bool(m.all()) for m in masks(model).values())
    for layer in method(model).masked_layers().values():
        if layer.out_features == width(model):  # W_up: still zero
            assert not layer.weight.any()
    assert torch.equal(logits(model, batch), ref)


def test_unpruned_equals_dense_adapter() -> None:
    """Equal weights, the same forward (gated, parallel, scaled) as ``adapter``."""
    extra = {"gate": True, "parallel": True, "scaling": 4.0, "placement": "houlsby"}
    batch = inputs("bert")
    dense = build("bert")
    torch.manual_seed(0)
    unipelt.attach(dense, {"method": "adapter", "bottleneck": M, **extra})
    sparse = attached("bert", **extra)
    perturb(sparse)
    weights = {k: v for k, v in method(sparse).state_dict().items() if not k.endswith(".mask")}
    dense.unipelt_deltas["adapter"].load_state_dict(weights)  # strict: the same parameters, by name
    assert torch.equal(logits(dense, batch), logits(sparse, batch))


# ------------------------------------------------------------------------------------------ SNIP


@pytest.mark.parametrize("family", FAMS)
def test_snip_density_rule_and_determinism(family: str) -> None:
    s = 0.6
    model = attached(family, sparsity=s)
    raw = {k: v.detach().clone() for k, v in method(model).state_dict().items() if not k.endswith(".mask")}
    model.train()
    achieved = snip_prune(model, batches(family))
    assert model.training and all(m.training for m in model.modules())  # train/eval flags restored
    first = masks(model)
    d = width(model)
    assert len(achieved) == len(first) == 2 * len(attachment(model).model_map.layers)
    for name, layer in method(model).masked_layers().items():
        n = layer.weight.numel()
        keep = max(1, math.floor((1 - s) * n + 0.5))
        assert n == d * M and int(layer.mask.sum()) == keep
        site, part = name.split(".")[1:]
        assert achieved[f"sparse_adapter.{site}.{part}"] == pytest.approx(1 - keep / n)
        # the scores are not degenerate: the mask is not just the lowest flat indices
        assert not torch.equal(layer.mask.reshape(-1), torch.arange(n) < keep)
    # stored weights untouched
    assert all(torch.equal(v, method(model).state_dict()[k]) for k, v in raw.items())
    snip_prune(model, batches(family))  # again on the same model and batches
    assert all(torch.equal(first[k], v) for k, v in masks(model).items())
    other = attached(family, sparsity=s)  # a fresh model with the same seed
    snip_prune(other, batches(family))
    assert all(torch.equal(first[k], v) for k, v in masks(other).items())
    snip_prune(other, batches(family, seeds=(5, 6)))
    assert any(not torch.equal(first[k], v) for k, v in masks(other).items())


def test_snip_scores_follow_the_documented_rule() -> None:
    """Recompute the masks by hand: W_up by |g| at init, W_down by |g * w| with W_up at its masked first step."""
    s, batch = 0.5, labelled("bert")
    model = attached("bert", sparsity=s)
    snip_prune(model, [batch])
    ref = attached("bert", sparsity=s)  # dense, same weights
    sites = method(ref).adapters

    def grads() -> dict[str, torch.Tensor]:
        ref.eval()
        ref.zero_grad(set_to_none=True)
        ref(**batch).loss.backward()
        return {k: (b.down.weight.grad.clone(), b.up.weight.grad.clone()) for k, b in sites.items()}

    def top(score: torch.Tensor) -> torch.Tensor:
        keep = math.floor((1 - s) * score.numel() + 0.5)
        order = torch.argsort(-score.reshape(-1).double(), stable=True)[:keep]
        return torch.zeros(score.numel(), dtype=torch.bool).index_fill_(0, order, True).view(score.shape)

    first = grads()
    with torch.no_grad():
        for k, b in sites.items():
            g_up = first[k][1]
            assert not first[k][0].any()  # W_up = 0 blocks W_down's gradient: plain SNIP is degenerate
            b.up.mask.copy_(top(g_up.abs()))
            b.up.weight.copy_(-g_up / (math.sqrt(3 * M) * g_up.pow(2).mean().sqrt()))
    second = grads()
    for k, b in sites.items():
        got = method(model).adapters[k]
        assert torch.equal(got.up.mask, b.up.mask)
        assert torch.equal(got.down.mask, top((second[k][0] * b.down.weight.detach()).abs()))


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("family", FAMS)
def test_training_keeps_pruned_weights_zero(family: str) -> None:
    model = attached(family, sparsity=0.7)
    snip_prune(model, batches(family))
    fixed = masks(model)
    own = {id(p) for p in model.unipelt_deltas.parameters()}
    own |= {id(p) for h in attachment(model).model_map.head_modules.values() for p in h.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for i in range(3):
        opt.zero_grad()
        model(**labelled(family, seed=10 + i)).loss.backward()
        for layer in method(model).masked_layers().values():
            assert not layer.weight.grad[~layer.mask].any()
        opt.step()
    model.eval()
    assert all(torch.equal(fixed[k], v) for k, v in masks(model).items())
    for layer in method(model).masked_layers().values():
        assert not layer.masked_weight()[~layer.mask].any()
        if layer.out_features == width(model):  # W_up: started at zero, pruned entries never moved
            assert not layer.weight[~layer.mask].any() and layer.weight[layer.mask].any()
    for n, p in model.named_parameters():
        if id(p) not in own:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) in own)


# ------------------------------------------------------------------------------------------ save / load


def _saved(model: nn.Module, path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    unipelt.save(model, path)
    return (path / "delta.safetensors").stat().st_size, load_file(str(path / "delta.safetensors"))


@pytest.mark.parametrize(("sparsity", "form"), [(0.5, "bitmask"), (0.8, "bitmask"), (0.99, "indices")])
@pytest.mark.parametrize("family", FAMS)
def test_save_load_roundtrip_and_smaller_file(family: str, sparsity: float, form: str, tmp_path: Path) -> None:
    """Kept values plus the smaller of a packed bitmask (1/8 byte an entry) and int32 indices (4 bytes a
    kept entry): the bitmask unless fewer than one entry in 32 is kept; smaller than dense at s = 0.5."""
    model = attached(family, sparsity=sparsity)
    snip_prune(model, batches(family))
    perturb(model)  # every kept weight (and the pruned stored ones) non-zero
    batch = inputs(family)
    expected = logits(model, batch)
    size, tensors = _saved(model, tmp_path / "sparse")
    other = {"bitmask": "indices", "indices": "bitmask"}[form]
    for name, layer in method(model).masked_layers().items():
        key = f"sparse_adapter.{name}"
        assert f"{key}.weight" not in tensors and f"{key}.mask" not in tensors and f"{key}.{other}" not in tensors
        assert tensors[f"{key}.values"].numel() == int(layer.mask.sum())
        assert tensors[f"{key}.{form}"].dtype == (torch.uint8 if form == "bitmask" else torch.int32)
        if form == "bitmask":
            assert tensors[f"{key}.bitmask"].numel() == -(-layer.mask.numel() // 8)
        assert tensors[f"{key}.shape"].tolist() == list(layer.weight.shape)
    loaded = unipelt.load(build(family), tmp_path / "sparse")
    assert torch.equal(logits(loaded, batch), expected)
    assert all(torch.equal(masks(model)[k], v) for k, v in masks(loaded).items())
    for k, layer in method(loaded).masked_layers().items():
        assert torch.equal(layer.masked_weight(), method(model).masked_layers()[k].masked_weight())
        assert not layer.weight[~layer.mask].any()

    dense = build(family)
    torch.manual_seed(0)
    unipelt.attach(dense, {"method": "adapter", "bottleneck": M})
    dense_size, _ = _saved(dense, tmp_path / "dense")
    assert size < dense_size


def test_unpruned_saves_dense_and_round_trips(tmp_path: Path) -> None:
    model = attached("bert")
    perturb(model)
    size, tensors = _saved(model, tmp_path / "d")
    assert "sparse_adapter.adapters.layers0_ffn.down.weight" in tensors
    assert not any(k.endswith((".values", ".indices", ".mask")) for k in tensors)
    loaded = unipelt.load(build("bert"), tmp_path / "d")
    assert torch.equal(logits(loaded, inputs("bert")), logits(model, inputs("bert")))
    assert all(bool(m.all()) for m in masks(loaded).values())


def test_mismatched_sparse_tensors_are_delta_file_errors(tmp_path: Path) -> None:
    model = attached("bert", sparsity=0.8)
    snip_prune(model, batches("bert"))
    unipelt.save(model, tmp_path / "a")
    other = attached("bert", sparsity=0.8, bottleneck=8)  # a config whose matrices have another shape
    unipelt.save(other, tmp_path / "b")
    (tmp_path / "b" / "delta.safetensors").write_bytes((tmp_path / "a" / "delta.safetensors").read_bytes())
    data = json.loads((tmp_path / "b" / "unipelt.json").read_text())
    data["delta_sha256"] = hashlib.sha256((tmp_path / "b" / "delta.safetensors").read_bytes()).hexdigest()
    (tmp_path / "b" / "unipelt.json").write_text(json.dumps(data))
    with pytest.raises(unipelt.DeltaFileError, match="shape"):
        unipelt.load(build("bert"), tmp_path / "b")


def test_bitmask_that_disagrees_with_its_values_is_a_delta_file_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = attached("bert", sparsity=0.5)
    snip_prune(model, batches("bert"))
    unipelt.save(model, tmp_path / "a")
    path = tmp_path / "a" / "delta.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".bitmask"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 1  # one entry more or fewer than the saved values
    save_file(tensors, str(path))
    data = json.loads((tmp_path / "a" / "unipelt.json").read_text())
    data["delta_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "a" / "unipelt.json").write_text(json.dumps(data))
    with pytest.raises(unipelt.DeltaFileError, match="bitmask keeps"):
        unipelt.load(build("bert"), tmp_path / "a")


# ------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("s", [0.5, 0.6, 0.7, 0.8])
def test_large_sparse_keeps_the_dense_budget(s: float) -> None:
    model = attached("bert", sparsity=s, large_sparse=True)
    wide = math.floor(M / (1 - s) + 0.5)
    assert method(model).config.effective_bottleneck == wide
    snip_prune(model, batches("bert", seeds=(1,)))
    d, sites = width(model), len(method(model).adapters)
    for layer in method(model).masked_layers().values():
        assert layer.weight.numel() == d * wide and int(layer.mask.sum()) == d * M
        assert 1 - d * M / layer.weight.numel() == pytest.approx(s, abs=(1 - s) / wide)
    dense_adapter = sites * (2 * d * M + d + M)
    assert method(model).nonzero_parameters() == dense_adapter + sites * (wide - M)  # wider down bias only


@pytest.mark.parametrize("extra", [{}, {"gate": True}, {"sparsity": 0.75, "large_sparse": True}],
                         ids=["plain", "gate", "large_sparse"])
@pytest.mark.parametrize("family", FAMS)
def test_trainable_count_formula(family: str, extra: dict) -> None:
    model = attached(family, **extra)
    s = extra.get("sparsity", 0.5)
    m = math.floor(M / (1 - s) + 0.5) if extra.get("large_sparse") else M
    d, sites = width(model), len(attachment(model).model_map.layers)  # Pfeiffer: one adapter per layer
    gate = d + 1 if extra.get("gate") else 0
    assert unipelt.trainable_parameters(model)["sparse_adapter"] == sites * (2 * d * m + d + m + gate)
    assert method(model).nonzero_parameters() == sites * (2 * d * m + d + m + gate)  # before pruning: dense
    snip_prune(model, batches(family, seeds=(1,)))
    keep = d * M if extra.get("large_sparse") else math.floor((1 - s) * d * m + 0.5)
    assert method(model).nonzero_parameters() == sites * (2 * keep + d + m + gate)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": 1.5}, {"sparsity": float("nan")},
                                 {"sparsity": True}, {"sparsity": "0.5"}, {"large_sparse": "yes"}])
def test_bad_config_is_config_error(bad: dict) -> None:
    with pytest.raises(unipelt.ConfigError):
        unipelt.parse_config(config(**bad))
    model = build("bert")
    with pytest.raises(unipelt.ConfigError):
        unipelt.attach(model, config(**bad))


def test_snip_prune_errors_and_custom_loss() -> None:
    with pytest.raises(unipelt.ConfigError, match="no sparse_adapter"):
        snip_prune(unipelt.attach(build("bert"), "adapter"), batches("bert"))
    model = attached("llama", sparsity=0.5)
    with pytest.raises(unipelt.ConfigError, match="at least one batch"):
        snip_prune(model, [])
    with pytest.raises(unipelt.ConfigError, match="no loss"):
        snip_prune(model, [inputs("llama")])
    assert all(bool(m.all()) for m in masks(model).values())  # a failed pruning leaves the adapter dense

    def next_token(out) -> torch.Tensor:
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                               inputs("llama")["input_ids"][:, 1:].reshape(-1))

    achieved = snip_prune(model, [inputs("llama")], loss_fn=next_token)
    assert set(achieved.values()) == {0.5}
    assert all(isinstance(m, MaskedLinear) for m in method(model).masked_layers().values())

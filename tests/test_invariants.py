"""Invariants every method keeps on every family it applies to.

1. zero-initialised deltas leave the model unchanged, whatever the gates say; prefix and prompt change it;
2. one optimiser step changes only the deltas and the task head;
3. save -> load into a fresh model reproduces the outputs; wrong or corrupt files are clear errors;
4. merge folds mergeable deltas exactly and warns about the rest; detach restores the base model exactly;
5. trainable counts follow the formulas of /work/shared/METHODS.md, computed here from the model's dimensions;
6. prefixes respect padding and give the same outputs with eager and SDPA attention;
7. bad configs and unsupported models are clear errors.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import runpy
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import unipelt
from conftest import FAMILIES, build, inputs, logits, perturb_, step
from unipelt.runtime import Gate

# Top-level modules of a task model trained with the delta (the list in unipelt/families.py).
HEADS = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head", "pooler")
PREFIX_HIDDEN = 512

METHODS: dict[str, object] = {
    "lora": "lora",
    "lora_all": {"method": "lora", "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]},
    "lora_fold": {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "fold": True},
    "lora_dora": {"method": "lora", "dora": True},
    "lora_dora_fold": {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "dora": True, "fold": True},
    "lora_pissa": {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "init": "pissa"},
    "lora_olora_fold": {"method": "lora", "r": 4, "targets": ["q", "v", "ffn_out"], "init": "olora", "fold": True},
    "lora_pissa_dora": {"method": "lora", "r": 4, "init": "pissa", "dora": True},
    "houlsby": "houlsby",
    "pfeiffer": "pfeiffer",
    "pfeiffer_zero_up": {"method": "pfeiffer", "init": "lora"},  # inside the LayerNorm, W_up = 0: the identity
    "parallel": "parallel",
    "scaled_parallel": {"method": "scaled_parallel", "bottleneck": 16},
    "bitfit": "bitfit",
    "ia3": "ia3",
    "ln": "ln",
    "prefix": "prefix",
    "prefix_direct": {"method": "prefix", "reparam": False},
    "prompt": {"method": "prompt", "length": 4},
    "mam": {"method": "mam", "prefix": {"length": 4}, "adapter": {"bottleneck": 16, "parallel": True, "scaling": 4.0}},
    "unipelt": {"method": "unipelt", "adapter": {"bottleneck": 16}, "prefix": {"length": 4}, "lora": {"r": 4}},
    "unipelt_prompt": {"method": "unipelt", "adapter": {"bottleneck": 16}, "prefix": {"length": 4}, "lora": {"r": 4},
                       "prompt": {"length": 3}},
    "unipelt_noprefix": {"method": "unipelt", "adapter": {"bottleneck": 16, "init": "lora"}, "prefix": None,
                         "lora": {"r": 4}},
    "unipelt_legacy": {"method": "unipelt_legacy", "adapter": {"bottleneck": 16}, "prefix": {"length": 4},
                       "lora": {"r": 4}},
    "compacter": {"method": "compacter", "bottleneck": 8},
    "compacter++": {"method": "compacter++", "bottleneck": 8},
    "phm_adapter": {"method": "phm_adapter", "bottleneck": 8, "n": 4},  # the default n = 12 does not divide 32
    "adapter_bias": "adapter_bias",
    "krona": {"method": "krona", "a_out": 4, "a_in": 4},
    "krona_ffn": {"method": "krona_ffn", "a_out": 4, "a_in": 4},
    "krona_ffn_res": {"method": "krona_ffn", "a_out": 4, "a_in": 4, "residual_scale": 0.5},
    "kadaptation": {"method": "kadaptation", "n": 4, "rank": 2},
    "sparse_adapter": {"method": "sparse_adapter", "bottleneck": 16, "sparsity": 0.5},
    "poly": {"method": "poly", "skills": 3, "r": 2},
    "poly_s": {"method": "poly_s", "skills": 3, "r": 2, "heads": 2},
    "vpt": {"method": "vpt", "length": 3},
    "vpt_deep": {"method": "vpt_deep", "length": 3},
    "composition": "composition",  # built fresh per test by _config (a Composition object is mutable)
    "composition_two_lora": "composition_two_lora",
    "composition_partial": "composition_partial",
    "composition_catalogue": "composition_catalogue",
}

ZERO_INIT = {"lora", "lora_all", "lora_fold", "lora_dora", "lora_dora_fold", "lora_pissa", "lora_olora_fold",
             "lora_pissa_dora", "pfeiffer_zero_up", "parallel", "scaled_parallel", "bitfit", "ia3",
             "ln",
             "unipelt_noprefix", "composition", "composition_two_lora", "composition_partial",
             "adapter_bias", "krona", "composition_catalogue", "krona_ffn",
             "kadaptation", "poly", "poly_s"}
# serial adapters start at N(0, 0.02) (the references' "bert" init), not at the identity
NOT_IDENTITY = {"prefix", "prefix_direct", "prompt", "mam", "unipelt", "unipelt_prompt", "unipelt_legacy",
                "krona_ffn_res", "vpt", "vpt_deep", "houlsby", "pfeiffer", "compacter", "compacter++", "phm_adapter",
                "sparse_adapter"}
# the smallest change at init: N(0, 0.02) serial adapters, Compacter's Xavier factors times N(0, 1e-4) rules
NOT_IDENTITY_ATOL = {"houlsby": 1e-9, "pfeiffer": 1e-9, "compacter": 1e-10, "compacter++": 1e-10, "phm_adapter": 1e-8}
MERGEABLE = {"lora", "lora_all", "lora_fold", "lora_dora", "lora_dora_fold", "lora_pissa", "lora_olora_fold",
             "lora_pissa_dora", "bitfit", "ia3", "ln", "composition_two_lora", "krona", "adapter_bias",
             "kadaptation"}
NO_FFN_BIAS = {"llama", "t5"}  # W_2 without a bias cannot hold AdapterBias' constant shift: it stays a delta
PREFIX_STYLE = {"prefix", "prefix_direct", "mam", "unipelt", "unipelt_prompt", "unipelt_legacy"}
GATED = {"unipelt", "unipelt_prompt", "unipelt_noprefix", "unipelt_legacy", "composition", "composition_partial",
         "composition_catalogue"}

# The how-to guide's example method (docs/snippets/new_method.py), entered in this matrix as the guide says.
# tests/test_adding_a_method.py runs this file with UNIPELT_GUIDE_METHOD=1 in a process of its own, so the
# example never joins the registry that the other tests see.
if os.environ.get("UNIPELT_GUIDE_METHOD"):
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "docs" / "snippets" / "new_method.py"))
    METHODS["ffn_scale"] = "ffn_scale"
    ZERO_INIT.add("ffn_scale")
    MERGEABLE.add("ffn_scale")
assert set(METHODS) == ZERO_INIT | NOT_IDENTITY and not ZERO_INIT & NOT_IDENTITY


def _config(key: str):
    if key == "composition":
        return unipelt.Composition(methods=[
            {"method": "lora", "gate": True},
            "ia3",
            {"method": "houlsby", "gate": True, "bottleneck": 8, "init": "lora"},
        ])
    if key == "composition_two_lora":
        return unipelt.Composition(methods=[
            {"method": "lora", "r": 4},
            {"method": "lora", "r": 2, "targets": ["o", "ffn_out"]},
            "ln",
        ])
    if key == "composition_partial":  # the adapter stays at merge; lora and ln touch other modules and fold
        return unipelt.Composition(methods=[
            {"method": "pfeiffer", "gate": True, "bottleneck": 8, "init": "lora"},
            {"method": "lora", "r": 4},
            "ln",
        ])
    if key == "composition_catalogue":  # newer catalogue methods, gated, beside one that merges
        return unipelt.Composition(methods=[
            {"method": "krona", "a_out": 4, "a_in": 4, "gate": True},
            {"method": "compacter++", "bottleneck": 8, "gate": True, "init": "lora"},
            "adapter_bias",
        ])
    return copy.deepcopy(METHODS[key])


def mergeable(family: str, key: str) -> bool:
    return key in MERGEABLE and not (key == "adapter_bias" and family in NO_FFN_BIAS)


def not_applicable(family: str, key: str) -> str | None:
    """The documented exclusions: why ``key`` cannot attach to ``family`` (None when it can)."""
    if key == "bitfit" and family in ("llama", "t5"):
        return "bias"
    if key in PREFIX_STYLE and family == "deberta-v2":
        return "prefix"
    if key in ("vpt", "vpt_deep") and family != "vit":
        return "vision"
    return None


ALL = [(f, m) for f in sorted(FAMILIES) for m in METHODS]
APPLICABLE = [pytest.param(f, m, id=f"{f}-{m}") for f, m in ALL if not_applicable(f, m) is None]
EXCLUDED = [pytest.param(f, m, id=f"{f}-{m}") for f, m in ALL if not_applicable(f, m) is not None]


def _select(keys: set[str]) -> list:
    return [pytest.param(f, m, id=f"{f}-{m}") for f, m in ALL if m in keys and not_applicable(f, m) is None]


# --------------------------------------------------------------------------------------------- helpers


def attached(family: str, key: str, seed: int = 0) -> nn.Module:
    model = build(family)
    torch.manual_seed(seed)
    return unipelt.attach(model, _config(key))


def store(model: nn.Module) -> nn.ModuleDict:
    return model.unipelt_deltas


def delta_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in store(model).parameters()}


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 7, heads: bool = True) -> None:
    """Random values in every delta parameter (and the head), so that outputs depend on all of them."""
    params = list(store(model).parameters())
    if heads:
        params += [p for n, m in model.named_children() if n in HEADS for p in m.parameters()]
    perturb_(params, seed, 0.1, draw_in_dtype=True)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, _ in model.named_children() if n in HEADS)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hook_count(model: nn.Module) -> int:
    """Module hooks plus instance-level ``forward`` wrappers (the core wraps the model's own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in vars(m)) for m in model.modules())


# ------------------------------------------------------- independent parameter counts (METHODS.md formulas)


@dataclass
class Layer:
    attentions: int  # 1 (self) or 2 (self + cross)
    ff: int  # FFN width
    ffn_in: int  # how many projections read the FFN input (LLaMA: gate_proj and up_proj)


@dataclass
class Dims:
    d: int
    q: int  # query width (heads * head_dim)
    kv: int  # key/value width (kv_heads * head_dim)
    layers: list[Layer]

    @property
    def n_attn(self) -> int:
        return sum(layer.attentions for layer in self.layers)


def dims(family: str, model: nn.Module) -> Dims:
    c = model.config
    d = c.hidden_size
    if family == "llama":
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    elif family == "t5":
        q = kv = c.num_heads * c.d_kv
    else:
        q = kv = d
    if family == "t5":
        return Dims(d, q, kv, [Layer(1, c.d_ff, 1)] * c.num_layers + [Layer(2, c.d_ff, 1)] * c.num_decoder_layers)
    if family == "bart":
        return Dims(d, q, kv, [Layer(1, c.encoder_ffn_dim, 1)] * c.encoder_layers
                    + [Layer(2, c.decoder_ffn_dim, 1)] * c.decoder_layers)
    if family == "gpt2":
        ff = c.n_inner or 4 * d
    elif family == "distilbert":
        ff = c.hidden_dim
    else:
        ff = c.intermediate_size
    return Dims(d, q, kv, [Layer(1, ff, 2 if family == "llama" else 1)] * c.num_hidden_layers)


def lora_count(D: Dims, r: int, targets=("q", "v"), gate: bool = False, dora: bool = False) -> int:
    """r (d_in + d_out) per adapted matrix, plus d_in + 1 per gate, plus d_out per DoRA magnitude (PiSSA's and
    OLoRA's frozen A_0, B_0 are buffers, not trained)."""
    shapes = {"q": (D.d, D.q), "k": (D.d, D.kv), "v": (D.d, D.kv), "o": (D.q, D.d)}
    total = 0
    for layer in D.layers:
        mats = [shapes[t] for t in targets if t in shapes] * layer.attentions
        if "ffn_in" in targets:
            mats += [(D.d, layer.ff)] * layer.ffn_in
        if "ffn_out" in targets:
            mats += [(layer.ff, D.d)]
        total += sum(r * (i + o) + (i + 1 if gate else 0) + (o if dora else 0) for i, o in mats)
    return total


def adapter_count(D: Dims, m: int, houlsby: bool, gate: bool = False) -> int:
    per = 2 * D.d * m + D.d + m + (D.d + 1 if gate else 0)
    n = sum((layer.attentions if houlsby else 0) + 1 for layer in D.layers)
    return n * per


def prefix_count(D: Dims, length: int, reparam: bool, gate: bool = False, hidden: int = PREFIX_HIDDEN) -> int:
    N, gates = D.n_attn, (D.n_attn * (D.d + 1) if gate else 0)
    if not reparam:
        return N * 2 * length * D.kv + gates
    h = hidden
    return length * D.d + (D.d * h + h) + (h * 2 * N * D.kv + 2 * N * D.kv) + gates


def compacter_count(D: Dims, m: int, houlsby: bool, n: int = 4, full: bool = False, gate: bool = False) -> int:
    """Shared rules n^3 plus per adapter rank-1 factors r (out + in) and a bias for W_down and W_up
    (3 (d + m)); PHM-Adapter: own rules n^3 and full factors out in / n per PHM layer. Houlsby: after the
    self-attention and the FFN (none after a cross-attention). The trained LayerNorms: ``ln_count``."""
    adapters = len(D.layers) * (2 if houlsby else 1)
    if full:
        per = 2 * n ** 3 + 2 * D.d * m // n + D.d + m
        return adapters * (per + (D.d + 1 if gate else 0))
    return n ** 3 + adapters * (3 * (D.d + m) + (D.d + 1 if gate else 0))


def krona_count(D: Dims, a_out: int, a_in: int, gate: bool = False) -> int:
    """a_out a_in + (d_out / a_out)(d_in / a_in) per adapted matrix (W_q, W_v), d_in + 1 per gate."""
    shapes = [(D.d, D.q), (D.d, D.kv)]
    per = sum(a_out * a_in + (o // a_out) * (i // a_in) + (i + 1 if gate else 0) for i, o in shapes)
    return D.n_attn * per


def adapter_bias_count(family: str, D: Dims) -> int:
    """v and alpha, d + d_ff + 1 per layer; the LayerNorms AdapterBias' reference trains: each layer's FFN norm
    and the norms outside the layers (the embeddings' LN; pre-LN stacks' final norms; BART's two embedding LNs),
    gain and bias each (LLaMA's and T5's RMSNorms: a gain only)."""
    outside = 2 if family in ("t5", "bart") else 1
    norm = D.d if family in ("llama", "t5") else 2 * D.d
    return sum(D.d + layer.ff + 1 for layer in D.layers) + (len(D.layers) + outside) * norm


def ia3_count(D: Dims) -> int:
    return sum(layer.attentions * 2 * D.kv + layer.ff for layer in D.layers)


def body_modules(model: nn.Module):
    heads = head_prefixes(model)
    return [(n, m) for n, m in model.named_modules() if n and not (n + ".").startswith(heads)]


def bitfit_count(model: nn.Module) -> int:
    return sum(m.bias.numel() for _, m in body_modules(model)
               if isinstance(m, (nn.Linear, Conv1D, nn.LayerNorm, nn.Conv2d)) and m.bias is not None)


def ln_count(model: nn.Module) -> int:
    total = 0
    for _, m in body_modules(model):
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm")):
            total += m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
    return total


def expected_counts(family: str, key: str, model: nn.Module) -> dict[str, int]:
    D = dims(family, model)
    houlsby = {"houlsby": True, "pfeiffer": False, "pfeiffer_zero_up": False, "parallel": False}
    if key in houlsby:  # the default bottleneck: d / 16
        return {"adapter": adapter_count(D, D.d // 16, houlsby[key])}
    table = {
        "ffn_scale": lambda: {"ffn_scale": D.d * len(D.layers)},  # the guide's example: d per FFN
        "lora": lambda: {"lora": lora_count(D, 8)},
        "lora_all": lambda: {"lora": lora_count(D, 8, ("q", "k", "v", "o", "ffn_in", "ffn_out"))},
        "lora_fold": lambda: {"lora": lora_count(D, 4, ("q", "v", "ffn_out"))},
        "lora_dora": lambda: {"lora": lora_count(D, 8, dora=True)},
        "lora_dora_fold": lambda: {"lora": lora_count(D, 4, ("q", "v", "ffn_out"), dora=True)},
        "lora_pissa": lambda: {"lora": lora_count(D, 4, ("q", "v", "ffn_out"))},
        "lora_olora_fold": lambda: {"lora": lora_count(D, 4, ("q", "v", "ffn_out"))},
        "lora_pissa_dora": lambda: {"lora": lora_count(D, 4, dora=True)},
        "scaled_parallel": lambda: {"adapter": adapter_count(D, 16, False)},
        "bitfit": lambda: {"bitfit": bitfit_count(model)},
        "ia3": lambda: {"ia3": ia3_count(D)},
        "ln": lambda: {"ln": ln_count(model)},
        "prefix": lambda: {"prefix": prefix_count(D, 10, True)},
        "prefix_direct": lambda: {"prefix": prefix_count(D, 10, False)},
        "prompt": lambda: {"prompt": 4 * D.d},
        "mam": lambda: {"prefix": prefix_count(D, 4, True, hidden=800), "adapter": adapter_count(D, 16, False)},
        "unipelt": lambda: {"adapter": adapter_count(D, 16, False, gate=True),
                            "prefix": prefix_count(D, 4, True, gate=True), "lora": lora_count(D, 4, gate=True)},
        "unipelt_prompt": lambda: {"adapter": adapter_count(D, 16, False, gate=True),
                                   "prefix": prefix_count(D, 4, True, gate=True), "lora": lora_count(D, 4, gate=True),
                                   "prompt": 3 * D.d},
        "unipelt_noprefix": lambda: {"adapter": adapter_count(D, 16, False, gate=True),
                                     "lora": lora_count(D, 4, gate=True)},
        "unipelt_legacy": lambda: {"adapter": adapter_count(D, 16, False, gate=True),
                                   "prefix": prefix_count(D, 4, True, gate=True), "lora": lora_count(D, 4, gate=True)},
        "composition": lambda: {"lora": lora_count(D, 8, gate=True), "ia3": ia3_count(D),
                                "adapter": adapter_count(D, 8, True, gate=True)},
        "composition_two_lora": lambda: {"lora": lora_count(D, 4), "lora_1": lora_count(D, 2, ("o", "ffn_out")),
                                         "ln": ln_count(model)},
        "composition_partial": lambda: {"adapter": adapter_count(D, 8, False, gate=True), "lora": lora_count(D, 4),
                                        "ln": ln_count(model)},
        "compacter": lambda: {"compacter": compacter_count(D, 8, True) + ln_count(model)},
        "compacter++": lambda: {"compacter": compacter_count(D, 8, False) + ln_count(model)},
        "phm_adapter": lambda: {"compacter": compacter_count(D, 8, True, full=True) + ln_count(model)},
        "adapter_bias": lambda: {"adapter_bias": adapter_bias_count(family, D)},
        "krona": lambda: {"krona": krona_count(D, 4, 4)},
        "krona_ffn": lambda: {"krona_ffn": len(D.layers) * (16 + (D.d // 4) ** 2)},
        "krona_ffn_res": lambda: {"krona_ffn": len(D.layers) * (16 + (D.d // 4) ** 2)},
        "kadaptation": lambda: {"kadaptation": 2 * 2 * 4 ** 2 + D.n_attn * 2 * ((D.q + D.d) + (D.kv + D.d))},
        # dense tensors, masks apart; Houlsby, a LayerNorm (2 d) in each adapter
        "sparse_adapter": lambda: {"sparse_adapter": adapter_count(D, 16, True)
                                   + 2 * D.d * sum(layer.attentions + 1 for layer in D.layers)},
        # skills x LoRA on q, k, v, o + one routing matrix (tasks x heads x skills) per adapted matrix
        # skills x LoRA on q, k, v, o + a routing matrix (tasks x heads x skills) per adapted matrix
        "poly": lambda: {"poly": 3 * lora_count(D, 2, ("q", "k", "v", "o")) + 4 * D.n_attn * 1 * 3},
        "poly_s": lambda: {"poly": 3 * lora_count(D, 2, ("q", "k", "v", "o")) + 4 * D.n_attn * 2 * 3},
        "vpt": lambda: {"vpt": 3 * D.d},
        "vpt_deep": lambda: {"vpt": len(D.layers) * 3 * D.d},
        "composition_catalogue": lambda: {"krona": krona_count(D, 4, 4, gate=True),
                                          "compacter": compacter_count(D, 8, False, gate=True) + ln_count(model),
                                          "adapter_bias": adapter_bias_count(family, D)},
    }
    return table[key]()


# ---------------------------------------------------------------------------------- 1. identity at init


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_init_identity_or_visible_change(family: str, key: str) -> None:
    model = build(family)
    batch = inputs(family)
    base = logits(model, batch)
    torch.manual_seed(0)
    unipelt.attach(model, _config(key))
    out = logits(model, batch)
    assert out.shape == base.shape
    if key in NOT_IDENTITY:  # an N(0, 0.02) adapter moves a random tiny model's logits by about 1e-7
        assert (out - base).abs().max() > NOT_IDENTITY_ATOL.get(key, 1e-6), \
            "prefix, prompt and N(0, 0.02) adapters change the output at init"
        return
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    gates = [m for m in store(model).modules() if isinstance(m, Gate)]
    assert bool(gates) == (key in GATED)
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        with torch.no_grad():
            for gate in gates:
                for p in gate.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 3.0)
        torch.testing.assert_close(logits(model, batch), base, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ 2. one step changes only deltas


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_one_step_changes_only_deltas_and_head(family: str, key: str) -> None:
    model = attached(family, key)
    before = state_copy(model)
    delta_keys = {k for k in before if k.startswith("unipelt_deltas.")}
    head_keys = {k for k in before if k.startswith(head_prefixes(model))}
    assert delta_keys
    step(model, family)
    after = model.state_dict()
    assert set(after) == set(before)
    for k in set(before) - delta_keys - head_keys:
        assert torch.equal(before[k], after[k]), f"base weight {k} changed"
    assert any(not torch.equal(before[k], after[k]) for k in delta_keys), "no delta parameter moved"
    if head_keys:
        assert any(not torch.equal(before[k], after[k]) for k in head_keys), "the task head did not train"
    for name, p in store(model).named_parameters():
        assert p.grad is not None, f"delta parameter {name} got no gradient"
    ids = delta_param_ids(model)
    for name, p in model.named_parameters():
        if id(p) not in ids and not name.startswith(head_prefixes(model)):
            assert not p.requires_grad and p.grad is None, f"base parameter {name} is trainable"


# ------------------------------------------------------------------------------ 5. trainable counts


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_trainable_count_matches_formula(family: str, key: str) -> None:
    model = attached(family, key)
    counts = unipelt.trainable_parameters(model)
    expected = expected_counts(family, key, model)
    assert {k: v for k, v in counts.items() if k not in ("head", "total")} == expected
    head = sum(p.numel() for n, m in model.named_children() if n in HEADS for p in m.parameters())
    assert counts["head"] == head
    assert counts["total"] == sum(expected.values()) + head


# ---------------------------------------------------------------------------- 3. save and load


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_save_load_roundtrip(family: str, key: str, tmp_path: Path) -> None:
    model = attached(family, key)
    batch = inputs(family)
    initial = logits(model, batch)
    perturb(model, heads=False)
    out = logits(model, batch)
    assert (out - initial).abs().max() > 1e-6, "perturbed deltas should change the output"
    perturb(model, seed=8, heads=True)  # the trained head is saved too
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    fresh = build(family)
    unipelt.load(fresh, tmp_path)
    loaded = logits(fresh, batch)
    reparam = key in ("prefix", "mam", "unipelt", "unipelt_prompt")
    torch.testing.assert_close(loaded, out, atol=1e-6 if reparam else 1e-7, rtol=0)
    assert sorted(store(fresh)) == sorted(store(model))
    if reparam:
        saved = load_file(str(tmp_path / "delta.safetensors"))
        prefix_keys = [k for k in saved if k.startswith("prefix.")]
        assert prefix_keys and all(k.startswith(("prefix.prefixes.", "prefix.gates.")) for k in prefix_keys)
        assert not hasattr(store(fresh)["prefix"], "mlp")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_into_other_model_fails(family: str, tmp_path: Path) -> None:
    model = attached(family, "lora")
    perturb(model)
    unipelt.save(model, tmp_path)
    names = sorted(FAMILIES)
    other = build(names[(names.index(family) + 1) % len(names)])
    with pytest.raises(unipelt.DeltaFileError):
        unipelt.load(other, tmp_path)
    assert "unipelt_deltas" not in other._modules
    wider = resized(family)
    with pytest.raises(unipelt.DeltaFileError):
        unipelt.load(wider, tmp_path)
    assert "unipelt_deltas" not in wider._modules


def resized(family: str) -> nn.Module:
    """The same family with hidden size 64 instead of 32."""
    config = copy.deepcopy(build(family).config)
    config.hidden_size = 64
    if family == "llama":
        config.head_dim = 16
    if family == "deberta-v2":
        config.pooler_hidden_size = 64
    torch.manual_seed(0)
    model = type(build(family))(config).eval()
    assert model.config.hidden_size == 64
    return model


def _flip(data: bytes, at: float) -> bytes:
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0xFF for b in data[i:i + 8]) + data[i + 8:]


def _rehash(folder: Path) -> None:
    import hashlib

    meta = json.loads((folder / "unipelt.json").read_text())
    meta["delta_sha256"] = hashlib.sha256((folder / "delta.safetensors").read_bytes()).hexdigest()
    (folder / "unipelt.json").write_text(json.dumps(meta))


def _wrong_tensors(folder: Path, how: str) -> None:
    tensors = load_file(str(folder / "delta.safetensors"))
    name = sorted(k for k in tensors if k.startswith("adapter."))[0]
    if how == "shape":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    else:
        del tensors[name]
    save_file(tensors, str(folder / "delta.safetensors"), metadata={"format": "unipelt-delta/1"})
    _rehash(folder)


CORRUPTIONS = {
    "delta_truncated": lambda f: (f / "delta.safetensors").write_bytes((f / "delta.safetensors").read_bytes()[:100]),
    "delta_empty": lambda f: (f / "delta.safetensors").write_bytes(b""),
    "delta_flipped": lambda f: (f / "delta.safetensors").write_bytes(_flip((f / "delta.safetensors").read_bytes(), .6)),
    "delta_missing": lambda f: (f / "delta.safetensors").unlink(),
    "delta_header_flipped_rehashed": lambda f: (
        (f / "delta.safetensors").write_bytes(_flip((f / "delta.safetensors").read_bytes(), 0.0)), _rehash(f)),
    "delta_wrong_shape_rehashed": lambda f: _wrong_tensors(f, "shape"),
    "delta_missing_tensor_rehashed": lambda f: _wrong_tensors(f, "missing"),
    "json_truncated": lambda f: (f / "unipelt.json").write_text((f / "unipelt.json").read_text()[:40]),
    "json_flipped": lambda f: (f / "unipelt.json").write_bytes(_flip((f / "unipelt.json").read_bytes(), .3)),
    "json_garbage": lambda f: (f / "unipelt.json").write_bytes(b"\x00\xff\xfe garbage"),
    "json_empty": lambda f: (f / "unipelt.json").write_text(""),
    "json_list": lambda f: (f / "unipelt.json").write_text("[1, 2]"),
    "json_no_base_model": lambda f: (f / "unipelt.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "unipelt.json").read_text()).items() if k != "base_model"})),
    "json_no_methods": lambda f: (f / "unipelt.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "unipelt.json").read_text()).items() if k != "methods"})),
}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_files_raise_delta_file_error(family: str, corruption: str, tmp_path: Path) -> None:
    model = attached(family, "houlsby")
    perturb(model)
    unipelt.save(model, tmp_path)
    CORRUPTIONS[corruption](tmp_path)
    fresh = build(family)
    batch = inputs(family)
    base = logits(fresh, batch)
    with pytest.raises(unipelt.DeltaFileError):
        unipelt.load(fresh, tmp_path)
    assert "unipelt_deltas" not in fresh._modules and "_unipelt" not in fresh.__dict__
    assert torch.equal(logits(fresh, batch), base)


# ----------------------------------------------------------------------------- 4. merge and detach


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_merge(family: str, key: str) -> None:
    model = build(family)
    next(iter(model.parameters())).requires_grad_(False)  # a user's own freezing comes back too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = hook_count(model)
    torch.manual_seed(0)
    unipelt.attach(model, _config(key))
    batch = inputs(family)
    perturb(model)
    out = logits(model, batch)
    names = set(store(model))
    if mergeable(family, key):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            unipelt.merge(model)
        torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)
        # indistinguishable from the base model: no store, no state, no hooks, trainability as before attach
        assert "unipelt_deltas" not in model._modules and "_unipelt" not in vars(model)
        assert hook_count(model) == hooks
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert unipelt.core.deltas(model) is not None and len(unipelt.core.deltas(model)) == 0
        return
    with pytest.warns(UserWarning, match="not mergeable"):
        unipelt.merge(model)
    kept = set(store(model))
    if key == "composition":  # gated lora and adapter stay; ia3 shares W_v with the gated lora before it
        assert {"lora", "adapter"} <= kept <= names
        torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)
    elif key == "composition_partial":  # lora folds; ln stays: the Pfeiffer adapter runs the FFN's LayerNorm again
        assert kept == {"adapter", "ln"}
        torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)
    elif key == "composition_catalogue":  # gated krona and compacter stay; adapter_bias shares W_2 with compacter
        assert {"krona", "compacter"} <= kept <= names
        torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)
    else:  # nothing here is mergeable (adapters, prefixes, prompts, gated lora)
        assert kept == names
        assert torch.equal(logits(model, batch), out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("order", ["lora_first", "ia3_first"])
def test_merge_of_deltas_sharing_modules_is_exact(family: str, order: str) -> None:
    """LoRA and IA3 on the same projections: merge folds only what it can fold exactly."""
    parts = [{"method": "lora", "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}, "ia3"]
    if order == "ia3_first":
        parts.reverse()
    model = build(family)
    torch.manual_seed(0)
    unipelt.attach(model, unipelt.Composition(methods=parts))
    perturb(model)
    batch = inputs(family)
    out = logits(model, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unipelt.merge(model)
    torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)
    if order == "lora_first":  # (W + BA) then scaled: both fold
        assert not caught and len(unipelt.core.deltas(model)) == 0
    else:  # l * (W x) + B A x on W_v but W_2 (l * a) + B A (l * a) on W_2: neither order folds both exactly
        assert caught and set(store(model)) <= {"ia3", "lora"}


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_detach_restores_base_exactly(family: str, key: str) -> None:
    model = build(family)
    first = next(iter(model.parameters()))
    first.requires_grad_(False)  # a user's own freezing must survive attach/detach
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original = state_copy(model)
    hooks, impl = hook_count(model), model.config._attn_implementation
    batch = inputs(family)
    base = logits(model, batch)
    torch.manual_seed(0)
    unipelt.attach(model, _config(key))
    step(model, family)
    perturb(model)
    assert hook_count(model) > hooks
    unipelt.detach(model)
    assert torch.equal(logits(model, batch), base)
    now = model.state_dict()
    assert list(now) == list(original)
    for k, v in original.items():
        assert torch.equal(now[k], v), f"{k} differs after detach"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "unipelt_deltas" not in model._modules and not hasattr(model, "_unipelt")
    assert hook_count(model) == hooks
    assert model.config._attn_implementation == impl
    assert unipelt.trainable_parameters(model)["head"] == 0


def test_a_forward_wrapped_before_attach_is_called_and_restored_by_detach() -> None:
    """accelerate wraps a model's ``forward`` on the instance (autocast, fp32 outputs); the core's call
    wrapper goes around it, and detach puts that wrapper back, not the class's forward."""
    model = build("bert")
    batch = inputs("bert")
    calls: list[int] = []
    inner = model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = counted
    base = logits(model, batch)
    unipelt.attach(model, {"method": "prompt", "length": 3})
    assert model.forward is not counted
    logits(model, batch)
    assert len(calls) == 2
    unipelt.detach(model)
    assert model.forward is counted
    assert torch.equal(logits(model, batch), base) and len(calls) == 3


# ---------------------------------------------------------------------- not applicable: clear errors


@pytest.mark.parametrize("family,key", EXCLUDED)
def test_not_applicable_raises_config_error(family: str, key: str) -> None:
    model = build(family)
    batch = inputs(family)
    base = logits(model, batch)
    why = not_applicable(family, key)
    match = {"bias": "no bias terms", "vision": "vpt prompts vision transformers; .* use method 'prompt'",
             "prefix": "prefix-style methods do not support family 'deberta-v2'"}[why]
    with pytest.raises(unipelt.ConfigError, match=match):
        unipelt.attach(model, _config(key))
    assert "unipelt_deltas" not in model._modules and not hasattr(model, "_unipelt")
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, batch), base)


# ------------------------------------------------------------------------- 6. prefix correctness


PREFIX_CASES = _select(PREFIX_STYLE)


def _row_alone(batch: dict[str, torch.Tensor], i: int, length: int) -> dict[str, torch.Tensor]:
    return {k: (v[i:i + 1, :length] if k in ("input_ids", "attention_mask") else v[i:i + 1]) for k, v in batch.items()}


@pytest.mark.parametrize("family,key", PREFIX_CASES)
def test_prefix_padding_matches_rows_alone(family: str, key: str) -> None:
    model = attached(family, key)
    perturb(model)
    batch = inputs(family, padded=True)
    together = logits(model, batch)
    mask = batch.get("attention_mask")
    if mask is not None:
        assert (mask.sum(1) < mask.shape[1]).any(), "the batch should hold a padded row"
    for i in range(together.shape[0]):
        length = int(mask[i].sum()) if mask is not None else None
        alone = logits(model, _row_alone(batch, i, length) if mask is not None else {
            k: v[i:i + 1] for k, v in batch.items()})[0]
        row = together[i]
        if FAMILIES[family].kind == "decoder" and row.dim() == 2:  # causal LM: one row of logits per token
            row = row[:length]
        torch.testing.assert_close(alone, row, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,key", PREFIX_CASES)
def test_prefix_eager_matches_sdpa(family: str, key: str) -> None:
    batch = inputs(family)
    outs = []
    state = None
    for impl in ("eager", "sdpa"):
        model = build(family)
        model.set_attn_implementation(impl)
        torch.manual_seed(0)
        unipelt.attach(model, _config(key))
        if state is None:
            perturb(model, heads=False)  # the two models share their (fresh) head
            state = store(model).state_dict()
        else:
            store(model).load_state_dict(state)
        outs.append(logits(model, batch))
        unipelt.detach(model)
        assert model.config._attn_implementation == impl
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- 7. error cases


def test_unknown_method_names_available_ones() -> None:
    with pytest.raises(unipelt.ConfigError, match="unknown method 'lorra'") as err:
        unipelt.attach(build("bert"), "lorra")
    for name in ("lora", "houlsby", "prefix", "unipelt", "bitfit"):
        assert name in str(err.value)
    with pytest.raises(unipelt.ConfigError, match="available"):
        unipelt.Composition(methods=["lora", "nope"]).validate()


@pytest.mark.parametrize("config,valid", [
    ({"method": "lora", "rank": 4}, ("r", "alpha", "targets", "dropout", "gate")),
    ({"method": "houlsby", "size": 4}, ("bottleneck", "placement", "scaling")),
    ({"method": "unipelt", "adapter": {"size": 4}}, ("bottleneck",)),
    ({"method": "prefix", "len": 3}, ("length", "reparam")),
])
def test_unknown_key_lists_valid_keys(config, valid) -> None:
    model = build("bert")
    with pytest.raises(unipelt.ConfigError, match="unknown key") as err:
        unipelt.attach(model, config)
    for name in valid:
        assert repr(name) in str(err.value)
    assert "unipelt_deltas" not in model._modules


@pytest.mark.parametrize("config", [
    {"method": "lora", "r": 0}, {"method": "lora", "r": -2}, {"method": "lora", "r": 33},
    {"method": "houlsby", "bottleneck": 0}, {"method": "prefix", "length": 0}, {"method": "prompt", "length": 0},
    {"method": "ia3", "gate": True}, {"method": "compacter", "n": 0}, {"method": "krona", "a_out": 0},
    {"method": "adapter_bias", "gate": True},
])
def test_bad_values_raise_config_error(config) -> None:
    model = build("bert")
    with pytest.raises(unipelt.ConfigError):
        unipelt.attach(model, config)
    assert "unipelt_deltas" not in model._modules and all(p.requires_grad for p in model.parameters())


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()
        self.lin = nn.Linear(4, 4)


def _mobilebert() -> nn.Module:
    config = transformers.MobileBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, embedding_size=16, intra_bottleneck_size=16,
                                           vocab_size=96, max_position_embeddings=64, num_feedforward_networks=1)
    return transformers.MobileBertForSequenceClassification(config)


@pytest.mark.parametrize("make,cls_name", [(_mobilebert, "MobileBertForSequenceClassification"), (_Toy, "_Toy")])
def test_unsupported_model(make, cls_name: str) -> None:
    model = make()
    with pytest.raises(unipelt.UnsupportedModelError) as err:
        unipelt.attach(model, "lora")
    assert cls_name in str(err.value) and "families.py" in str(err.value)
    assert "unipelt_deltas" not in model._modules and all(p.requires_grad for p in model.parameters())


def test_mam_dict_sizes_keep_the_papers_settings() -> None:
    """Overriding one field of a composite's part keeps the composite's other defaults."""
    model = unipelt.attach(build("bert"), {"method": "mam", "prefix": {"length": 4}, "adapter": {"bottleneck": 16}})
    adapter = store(model)["adapter"].config
    assert (adapter.bottleneck, adapter.parallel, adapter.scaling) == (16, True, 4.0)
    model = unipelt.attach(build("bert"), {"method": "unipelt", "adapter": {"activation": "gelu"}, "lora": {"r": 4}})
    assert store(model)["adapter"].config.placement == "pfeiffer" and store(model)["adapter"].bottleneck == 32 // 16
    assert store(model)["prefix"].config.init == "bert"  # UniPELT's prefix init, not PrefixConfig's default
    assert store(model)["lora"].config.alpha == 16.0
    model = unipelt.attach(build("bert"), "mam")
    assert store(model)["prefix"].config.reparam_hidden == 800 and store(model)["prefix"].config.length == 30
    model = unipelt.attach(build("bert"), {"method": "mam_glue", "adapter": {"scaling": 3.0}})
    prefix, adapter = store(model)["prefix"].config, store(model)["adapter"].config
    assert (prefix.length, prefix.reparam_hidden, adapter.bottleneck, adapter.scaling) == (16, 800, 16, 3.0)


@pytest.mark.parametrize(("config", "message"), [
    ({"method": "compacter", "bottleneck": 6}, r"bottleneck 6 is not divisible by n=4; use a multiple of 4"),
    ({"method": "compacter++", "bottleneck": 9, "n": 3}, r"model width divisible by n: 32 is not divisible by n=3"),
    ({"method": "krona", "a_out": 5, "a_in": 4}, r"a_out=5 must divide 32"),
])
def test_sizes_that_do_not_divide_are_named(config, message) -> None:
    """PHM layers need the width and bottleneck divisible by n; KronA's factors must divide the matrix."""
    model = build("bert")
    base = logits(model, inputs("bert"))
    with pytest.raises(unipelt.ConfigError, match=message):
        unipelt.attach(model, config)
    assert "unipelt_deltas" not in model._modules
    assert torch.equal(logits(model, inputs("bert")), base)


# ------------------------------------------------------------------ 8. copies of an attached model


def _param_storages(model: nn.Module) -> set[int]:
    return {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("family,key", APPLICABLE)
def test_deepcopy_is_independent_and_equal(family: str, key: str) -> None:
    """``copy.deepcopy`` (RLHF reference models, EMA copies, Trainer features) gives a model whose hooks read its
    own deltas: equal outputs, and a change to either model's delta leaves the other unchanged."""
    model = attached(family, key)
    perturb(model, heads=False)
    batch = inputs(family)
    out = logits(model, batch)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, batch), out, atol=0, rtol=0)
    assert not _param_storages(twin) & _param_storages(model), "the copy shares parameters with the original"
    assert sorted(store(twin)) == sorted(store(model))

    perturb(twin, seed=21, heads=False)
    changed = logits(twin, batch)
    assert (changed - out).abs().max() > 1e-6, "the copy's hooks do not read the copy's delta"
    torch.testing.assert_close(logits(model, batch), out, atol=0, rtol=0)

    perturb(model, seed=22, heads=False)
    assert (logits(model, batch) - out).abs().max() > 1e-6
    torch.testing.assert_close(logits(twin, batch), changed, atol=0, rtol=0)

    step(twin, family)  # training the copy moves its deltas only
    moved = logits(model, batch)
    unipelt.detach(twin)
    torch.testing.assert_close(logits(twin, batch), logits(build(family), batch), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), moved, atol=0, rtol=0)


@pytest.mark.parametrize("key", ["lora", "unipelt_prompt", "prefix"])
def test_copies_pickling_and_merge(key: str) -> None:
    model = attached("bert", key)
    perturb(model, heads=False)
    batch = inputs("bert")
    with pytest.raises(TypeError, match="cannot be pickled.*copy.deepcopy"):
        pickle.dumps(model)
    both = copy.deepcopy({"a": model, "b": model})  # one memo: one copy, shared as in the original
    assert both["a"] is both["b"] and both["a"] is not model
    torch.testing.assert_close(logits(both["a"], batch), logits(model, batch), atol=0, rtol=0)
    unipelt.detach(model)
    assert "__deepcopy__" not in vars(model) and "__reduce_ex__" not in vars(model)
    pickle.loads(pickle.dumps(model))  # a detached model is a plain model again


def test_deepcopy_of_served_tasks(tmp_path: Path) -> None:
    """A model serving several tasks in one batch (``load_tasks``) copies with its routing by task id."""
    folders = {}
    for i, name in enumerate(("a", "b")):
        model = build("bert")
        torch.manual_seed(i)
        unipelt.attach(model, "lora", train_head=False)
        perturb(model, seed=30 + i, heads=False)
        unipelt.save(model, tmp_path / name)
        folders[name] = tmp_path / name
    served = build("bert")
    unipelt.load_tasks(served, folders)
    batch = inputs("bert")
    task_ids = torch.tensor([0, 1, 0])
    out = logits(served, {**batch, "task_ids": task_ids})
    twin = copy.deepcopy(served)
    torch.testing.assert_close(logits(twin, {**batch, "task_ids": task_ids}), out, atol=0, rtol=0)
    perturb(twin, seed=40, heads=False)
    torch.testing.assert_close(logits(served, {**batch, "task_ids": task_ids}), out, atol=0, rtol=0)

"""The defaults of UniPELT and the methods it is made of are the authors' code's, checked against formulas
written out here (``test_adapters_equivalence.py`` checks the same functions against ``adapters``).

- UniPELT's gates are one value per example, the mean over its real tokens of the per-token sigmoids, so a
  padded row gives what it gives alone; LoRA's gate replaces alpha / r;
- the Pfeiffer adapter sits inside the FFN's LayerNorm, or reads ``h + x`` in a pre-LN model;
- serial adapters, UniPELT's prefix and every gate start at N(0, 0.02) with zero biases; parallel adapters and
  plain prefixes at their references' inits; the parallel adapter drops out its bottleneck in training;
- ``unipelt_legacy``'s parts compute what they say (its function equals the library's former UniPELT).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import build, inputs, logits, perturb_
from unipelt.core import deltas
from unipelt.methods.adapter import Adapter
from unipelt.runtime import Gate


def _perturbed(family: str, config, seed: int = 0) -> torch.nn.Module:
    model = build(family)
    torch.manual_seed(seed)
    unipelt.attach(model, config)
    perturb_(deltas(model).parameters(), 7, 0.3)
    return model


def _row_alone(model: torch.nn.Module, batch: dict, row: int) -> torch.Tensor:
    real = int(batch["attention_mask"][row].sum())
    return logits(model, {k: v[row:row + 1, :real] for k, v in batch.items()})[0]


# ---------------------------------------------------------------------------------------------- the gates


WITH_PROMPT = {"method": "unipelt", "prompt": {"length": 3, "join": "embeddings"}}
PADDING_CASES = [pytest.param(f, c, id=f"{f}-{'unipelt+prompt' if isinstance(c, dict) else c}")
                 for f in ("bert", "roberta", "distilbert", "bart") for c in ("unipelt", WITH_PROMPT)
                 if not (f == "bart" and isinstance(c, dict))]  # BART has no embeddings module to join after


@pytest.mark.parametrize(("family", "config"), PADDING_CASES)
def test_a_padded_row_gives_what_it_gives_alone(family: str, config) -> None:
    model = _perturbed(family, config)
    batch = inputs(family)  # the last row ends in padding
    out = logits(model, batch)
    torch.testing.assert_close(out[-1], _row_alone(model, batch, 2), atol=1e-5, rtol=0)
    # the reference's mean over every position (its batches are padded to 128) reads the padding
    reference = _perturbed(family, {**(config if isinstance(config, dict) else {"method": config}),
                                    "gate_pooling": "mean_with_padding"})
    assert (logits(reference, batch)[-1] - _row_alone(reference, batch, 2)).abs().max() > 1e-6


def test_lora_gate_replaces_alpha_over_r_and_is_one_value_per_example() -> None:
    """``h = W x + G B A x`` with ``G = mean over real tokens of sigmoid(w_g . x_t + b_g)``, for W_q."""
    model = _perturbed("bert", {"method": "lora", "r": 4, "alpha": 16, "gate": True, "targets": ["q"]})
    lora = deltas(model)["lora"]
    site = "layers0_self_q"
    query = model.bert.encoder.layer[0].attention.self.query
    seen = {}
    query.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach()))
    batch = inputs("bert")
    logits(model, batch)
    x, mask = seen["x"], batch["attention_mask"].float()[..., None]
    gate = lora.gates[site].proj
    g = (torch.sigmoid(x @ gate.weight.t() + gate.bias) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    pair = lora.pairs[site]
    expected = F.linear(x, query.weight, query.bias) + g * (x @ pair.A.weight.t() @ pair.B.weight.t())
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-5)
    assert (g.max() - g.min()) > 1e-4  # one value per row, and the rows differ


def test_adapter_gate_is_the_mean_of_sigmoids_of_the_adapters_input() -> None:
    model = _perturbed("bert", {"method": "pfeiffer", "gate": True, "bottleneck": 8})
    adapter = deltas(model)["adapter"]
    site = "layers0_ffn"
    norm = model.bert.encoder.layer[0].output.LayerNorm
    seen = {}
    norm.register_forward_hook(lambda m, args, out: seen.update(s=args[0].detach(), out=out.detach()))
    batch = inputs("bert")
    logits(model, batch)
    s, mask = seen["s"], batch["attention_mask"].float()[..., None]
    y = F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # the adapter reads LN(h + x)
    gate = adapter.gates[site].proj
    g = (torch.sigmoid(y @ gate.weight.t() + gate.bias) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    b = adapter.adapters[site]
    a = F.linear(F.relu(F.linear(y, b.down.weight, b.down.bias)), b.up.weight, b.up.bias)
    expected = F.layer_norm(s + g * a, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # the same LN again
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- placements


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_pfeiffer_in_a_pre_ln_model_reads_the_ffns_output_plus_its_residual(family: str, monkeypatch) -> None:
    """No LayerNorm after the FFN: ``x + h + A(h + x)``, as adapters computes without one."""
    model = _perturbed(family, {"method": "pfeiffer", "bottleneck": 8})
    method = deltas(model)["adapter"]
    site = next(iter(method.sites))
    layer = unipelt.core.attachment(model).model_map.layers[0]
    seen, original = {}, Adapter._delta

    def recording(self, site_key, x, padding_mask):
        delta = original(self, site_key, x, padding_mask)
        seen.setdefault(site_key, (x.detach(), delta.detach()))
        return delta

    monkeypatch.setattr(Adapter, "_delta", recording)
    layer.ffn_norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    layer.ffn_output_module.register_forward_hook(lambda m, args, out: seen.setdefault("out", out.detach()))
    logits(model, inputs(family))
    x_read, delta = seen[site]
    h = seen["out"] - delta  # the FFN's own output, before the adapter's delta
    torch.testing.assert_close(x_read, h + seen["x"], atol=1e-6, rtol=1e-5)


def test_houlsby_adds_after_the_sublayers_dropout_and_uses_swish() -> None:
    model = build("bert")
    unipelt.attach(model, "houlsby")
    method = deltas(model)["adapter"]
    assert method.config.activation == "swish" and isinstance(method.adapters["layers0_ffn"].act, torch.nn.SiLU)
    layer = model.bert.encoder.layer[0]
    hooked = {id(m) for m in (layer.attention.output.dropout, layer.output.dropout)}
    assert {id(site.output) for key, site in method.sites.items() if key.startswith("layers0")} == hooked


def test_legacy_ffn_placement_adds_to_w2s_output_before_its_dropout() -> None:
    model = build("bert")
    unipelt.attach(model, "unipelt_legacy")
    assert deltas(model)["adapter"].sites["layers0_ffn"].output is model.bert.encoder.layer[0].output.dense


def test_parallel_adapter_drops_out_its_bottleneck_in_training() -> None:
    """He et al.: dropout p = the model's hidden dropout on f(W_down x) (a serial adapter has none)."""
    model = _perturbed("bert", "parallel")
    method = deltas(model)["adapter"]
    assert method.dropout == model.config.hidden_dropout_prob == 0.1
    assert deltas(_perturbed("bert", "pfeiffer"))["adapter"].dropout == 0.0
    site, x = "layers0_ffn", torch.randn(2, 5, 32)
    method.train()
    torch.manual_seed(0)
    trained = method._delta(site, x, None)
    torch.manual_seed(0)
    b = method.adapters[site]
    h = F.dropout(F.relu(F.linear(x, b.down.weight, b.down.bias)), 0.1, True)
    torch.testing.assert_close(trained, method.config.scaling * F.linear(h, b.up.weight, b.up.bias))
    method.eval()
    torch.testing.assert_close(method._delta(site, x, None), method._delta(site, x, None))


# ------------------------------------------------------------------------------------------------ inits


def _stats(t: torch.Tensor) -> tuple[float, float]:
    return t.float().std().item(), t.float().abs().max().item()


def test_serial_adapters_start_at_bert_init_and_parallel_ones_at_lora_init() -> None:
    torch.manual_seed(0)
    serial = deltas(unipelt.attach(build("bert"), {"method": "pfeiffer", "bottleneck": 64}))["adapter"]
    for b in serial.adapters.values():
        for layer in (b.down, b.up):
            assert abs(_stats(layer.weight)[0] - 0.02) < 0.004 and not layer.bias.any()
    parallel = deltas(unipelt.attach(build("bert"), {"method": "parallel", "bottleneck": 64}))["adapter"]
    for b in parallel.adapters.values():
        bound = 1 / 32 ** 0.5  # Kaiming-uniform with a = sqrt(5): U(+-1 / sqrt(d))
        assert _stats(b.down.weight)[1] <= bound and _stats(b.down.weight)[0] > bound / 3
        assert not b.down.bias.any() and not b.up.weight.any() and not b.up.bias.any()


def test_every_gate_starts_at_normal_002_with_zero_bias() -> None:
    torch.manual_seed(0)
    gates = [m for m in deltas(unipelt.attach(build("bert"), "unipelt")).modules() if isinstance(m, Gate)]
    weights = torch.cat([g.proj.weight.flatten() for g in gates])
    assert len(gates) == 2 * 4 and abs(weights.std().item() - 0.02) < 0.005
    assert not any(g.proj.bias.any() for g in gates)


def test_prefix_inits_follow_their_references() -> None:
    torch.manual_seed(0)
    model = unipelt.attach(build("bert"), "unipelt")  # UniPELT's: N(0, 0.02), zero biases, no offset
    prefix = deltas(model)["prefix"]
    for p in (prefix.embedding, prefix.mlp[0].weight, prefix.mlp[2].weight):
        assert abs(_stats(p)[0] - 0.02) < 0.004
    assert not prefix.mlp[0].bias.any() and not prefix.mlp[2].bias.any() and prefix.start is None
    plain = deltas(unipelt.attach(build("bert"), "prefix"))["prefix"]  # Li and Liang's: PyTorch's own
    assert abs(_stats(plain.embedding)[0] - 1.0) < 0.2 and plain.mlp[2].bias.abs().max() > 0.01
    assert plain.start is None
    direct = deltas(unipelt.attach(build("bert"), {"method": "prefix", "reparam": False}))["prefix"]
    assert abs(_stats(direct.table)[0] - 1.0) < 0.1  # randn, as PrefixTuning's shallow prefix and peft's
    words = deltas(unipelt.attach(build("bert"), {"method": "prefix", "init": "words"}))["prefix"]
    assert words.start is not None and words.start.abs().max() > 0  # ours, by name only


def test_the_seeds_prompt_layer_starts_uniform_in_half_a_unit() -> None:
    torch.manual_seed(0)
    prompt = deltas(unipelt.attach(build("bert"), {"method": "prompt", "length": 50, "init": "uniform",
                                                    "join": "embeddings"}))["prompt"]
    e = prompt.embedding
    assert e.abs().max() <= 0.5 and abs(e.std().item() - (1 / 12) ** 0.5) < 0.02  # U(-0.5, 0.5)


def test_prompt_joined_after_the_embeddings_needs_an_embeddings_module() -> None:
    with pytest.raises(unipelt.ConfigError, match="join='embeddings' needs an embeddings module"):
        unipelt.attach(build("llama"), {"method": "prompt", "join": "embeddings"})


# ------------------------------------------------------------------------------------- unipelt_legacy


def test_legacy_lora_gate_scales_by_alpha_over_r_per_token() -> None:
    model = _perturbed("bert", {"method": "lora", "r": 4, "alpha": 16, "gate": True, "targets": ["q"],
                                "gate_scaling": "alpha", "gate_pooling": "token"})
    lora, site = deltas(model)["lora"], "layers0_self_q"
    query = model.bert.encoder.layer[0].attention.self.query
    seen = {}
    query.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach()))
    logits(model, inputs("bert"))
    x, gate = seen["x"], lora.gates[site].proj
    g = torch.sigmoid(x @ gate.weight.t() + gate.bias)  # (b, T, 1)
    delta = 4.0 * g * (x @ lora.pairs[site].A.weight.t() @ lora.pairs[site].B.weight.t())
    torch.testing.assert_close(seen["out"], F.linear(x, query.weight, query.bias) + delta, atol=1e-6, rtol=1e-5)


def test_logit_mean_pooling_is_the_sigmoid_of_the_mean_input() -> None:
    from unipelt.runtime import gate_values

    x, mask = torch.randn(3, 6, 8), torch.tensor([[1] * 6, [1] * 6, [1] * 4 + [0] * 2])
    w, b = torch.randn(1, 8), torch.randn(1)
    mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = torch.sigmoid(mean @ w.t() + b)[:, None]
    torch.testing.assert_close(gate_values(x @ w.t() + b, "logit_mean", mask, causal=False), expected)
    per_token = gate_values(x @ w.t() + b, "logit_mean", mask, causal=True)  # a decoder's stays per token
    torch.testing.assert_close(per_token, torch.sigmoid(x @ w.t() + b))


def test_legacy_preset_is_the_former_unipelt() -> None:
    config = unipelt.config.parse_config("unipelt_legacy")
    adapter, prefix, lora = config.expand()
    assert (adapter.placement, adapter.bottleneck, adapter.init, adapter.gate_pooling) == ("ffn", 48, "lora", "token")
    assert (prefix.init, prefix.gate_pooling, lora.gate_scaling, lora.gate_pooling) == \
        ("words", "logit_mean", "alpha", "token")
    from unipelt.train.loop import DEFAULT_PART_LR

    assert DEFAULT_PART_LR["unipelt_legacy"] == {"prefix": 0.1}

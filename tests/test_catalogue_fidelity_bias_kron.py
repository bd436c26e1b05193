"""AdapterBias, KAdaptation and KronA compute what their authors' references compute (issue 26, points 1, 8, 9).

- AdapterBias (Allen0307/AdapterBias): alpha reads W_2's input (d_ff wide), the shift goes after the FFN's
  dropout, the FFN-output and embeddings LayerNorms train, lr 1e-4;
- KAdaptation (eric-ai-lab/PEViT): 32 rules, one rule set for W_q and one for W_v, each of rank 1; an init
  that is the identity and trains (the released zero/zero init gives every factor a zero gradient);
- KronA: no reference code, which its docstring says.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import HIDDEN, build, inputs, logits, perturb_
from unipelt.core import deltas
from unipelt.methods import kadaptation, krona
from unipelt.methods.adapter_bias import AdapterBiasConfig
from unipelt.methods.kadaptation import KAdaptationConfig
from unipelt.train.loop import default_lr

D_FF = 64  # conftest's tiny BERT: d = 32, d_ff = 64, 2 layers


def _attached(family: str, config, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    model = build(family)
    torch.manual_seed(seed)
    unipelt.attach(model, config)
    perturb_(deltas(model).parameters(), 7, scale)
    return model


# ------------------------------------------------------------------------------------------- AdapterBias


def test_adapter_bias_alpha_reads_the_ffn_intermediate_and_the_shift_follows_the_dropout() -> None:
    """BertOutput(u, x) = LN'(dropout(W_2 u + b_2) + (w . u + c) v + x), LN' with the tuned gain and bias,
    written out here; in training mode too (the same dropout mask from the same seed)."""
    model = _attached("bert", "adapter_bias")
    method = deltas(model)["adapter_bias"]
    assert all(a.in_features == D_FF and a.out_features == 1 for a in method.alphas.values())
    g = torch.Generator().manual_seed(5)
    for i, layer in enumerate(model.bert.encoder.layer):
        out_module = layer.output
        u, x = torch.randn(3, 5, D_FF, generator=g), torch.randn(3, 5, HIDDEN, generator=g)
        alpha, v = method.alphas[f"layers{i}_ffn"], method.shifts[f"layers{i}_ffn"]
        ln_key = f"bert__encoder__layer__{i}__output__LayerNorm"
        gain, bias = method.layer_norms.gains[ln_key], method.layer_norms.biases[ln_key]
        assert (gain - out_module.LayerNorm.weight).abs().max() > 1e-3  # the tuned gain, not the base one

        def expected(training: bool, u=u, x=x, alpha=alpha, v=v, gain=gain, bias=bias, out_module=out_module):
            h = F.dropout(out_module.dense(u), out_module.dropout.p, training=training)
            weight = u @ alpha.weight[0] + alpha.bias[0]  # (3, 5): one weight per token, from the d_ff input
            return F.layer_norm(h + weight[..., None] * v + x, (HIDDEN,), gain, bias, out_module.LayerNorm.eps)

        with torch.no_grad():
            torch.testing.assert_close(out_module(u, x), expected(False), atol=1e-6, rtol=1e-6)
            out_module.dropout.p = 0.5
            out_module.train()
            torch.manual_seed(11)
            got = out_module(u, x)
            torch.manual_seed(11)
            torch.testing.assert_close(got, expected(True), atol=1e-6, rtol=1e-6)
            out_module.eval()


def test_adapter_bias_trains_the_ffn_and_embedding_layer_norms_only() -> None:
    model = build("bert")
    unipelt.attach(model, "adapter_bias")
    method = deltas(model)["adapter_bias"]
    assert sorted(method.layer_norms.norms) == ["bert__embeddings__LayerNorm",
                                                "bert__encoder__layer__0__output__LayerNorm",
                                                "bert__encoder__layer__1__output__LayerNorm"]
    # the tuned gains act: moving the embeddings' gain changes the output, and a loss reaches every gain
    batch = inputs("bert")
    base = logits(model, batch)
    model(**batch).logits.square().sum().backward()
    for k, gain in method.layer_norms.gains.items():
        assert gain.requires_grad and gain.grad is not None and gain.grad.abs().max() > 0, k
        assert method.layer_norms.biases[k].grad.abs().max() > 0, k
    perturb_([method.layer_norms.gains["bert__embeddings__LayerNorm"]], 3, 0.5)
    assert (logits(model, batch) - base).abs().max() > 1e-4
    # attention LayerNorms and every base weight stay frozen
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if not n.startswith(("unipelt_deltas", "classifier")))


def test_adapter_bias_trainable_count_is_the_formula() -> None:
    """L (d + d_ff + 1) for v and alpha, plus 2 d per trained LayerNorm (L FFN norms and the embeddings')."""
    L, d = 2, HIDDEN
    model = unipelt.attach(build("bert"), "adapter_bias")
    assert unipelt.trainable_parameters(model)["adapter_bias"] == L * (d + D_FF + 1) + 2 * d * (L + 1)
    alone = unipelt.attach(build("bert"), {"method": "adapter_bias", "train_layer_norms": False})
    assert unipelt.trainable_parameters(alone)["adapter_bias"] == L * (d + D_FF + 1)
    assert deltas(alone)["adapter_bias"].layer_norms is None


def test_adapter_bias_takes_the_reference_learning_rate() -> None:
    assert AdapterBiasConfig.reference_lr == 1e-4
    assert default_lr("adapter_bias", AdapterBiasConfig()) == 1e-4


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_adapter_bias_saves_loads_and_merges_exactly(family: str, tmp_path: Path) -> None:
    model = _attached(family, "adapter_bias")
    batch = inputs(family)
    out = logits(model, batch)
    assert (out - logits(build(family), batch)).abs().max() > 1e-4
    unipelt.save(model, tmp_path)
    fresh = build(family)
    unipelt.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), out, atol=1e-7, rtol=0)
    saved = deltas(model)["adapter_bias"].delta_state()
    norm_keys = [k for k in saved if k.startswith("layer_norms.")]
    assert norm_keys and all(k.startswith(("layer_norms.gains.", "layer_norms.biases.")) for k in norm_keys)
    if family == "llama":  # W_2 without a bias cannot hold c v: stays a delta
        assert not deltas(model)["adapter_bias"].mergeable()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # merge warns about a delta it keeps
        unipelt.merge(model)
    assert not hasattr(model, "unipelt_deltas")
    torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- KAdaptation


def test_kadaptation_defaults_are_the_references() -> None:
    config = KAdaptationConfig()
    assert (config.n, config.rank, config.rule_rank, tuple(config.targets)) == (32, 1, 1, ("q", "v"))
    model = unipelt.attach(build("bert"), "kadaptation")  # d = 32: n = 32 divides it
    method = deltas(model)["kadaptation"]
    assert sorted(method.rule_left) == sorted(method.rule_right) == ["q", "v"] and not len(method.rules)
    assert all(t.shape == (32, 32, 1) for t in method.rule_left.values())
    assert {method.site_rules[k] for k in method.sites if k.endswith("_q")} == {"q"}
    assert {method.site_rules[k] for k in method.sites if k.endswith("_v")} == {"v"}
    # 2 n^2 per rule set, rank (d_out + d_in) per matrix (W_q, W_v of 2 layers)
    assert unipelt.trainable_parameters(model)["kadaptation"] == 2 * 2 * 32 ** 2 + 2 * 2 * (HIDDEN + HIDDEN)


def test_kadaptation_delta_is_the_sum_of_kronecker_products_with_its_targets_rules() -> None:
    """Delta W = sum_i (l_i r_i^T) (x) (u_i v_i^T), written out with torch.kron; W_q's reads only the q
    rules and W_v's only the v rules."""
    model = _attached("bert", {"method": "kadaptation", "n": 4, "rank": 2, "rule_rank": 2})
    method = deltas(model)["kadaptation"]
    for site_key, proj in method.sites.items():
        target = site_key.rsplit("_", 1)[1]
        left, right = method.rule_left[target], method.rule_right[target]
        u, v = method.u[site_key], method.v[site_key]
        expected = sum(torch.kron(left[i] @ right[i], u[i] @ v[i]) for i in range(4))
        torch.testing.assert_close(method.delta_weight(site_key), expected, atol=1e-6, rtol=1e-6)
        x = torch.randn(2, 3, HIDDEN)
        with torch.no_grad():
            torch.testing.assert_close(proj.module(x), F.linear(x, proj.module.weight + expected, proj.module.bias),
                                       atol=1e-5, rtol=1e-5)
    before = {k: method.delta_weight(k).detach().clone() for k in method.sites}
    with torch.no_grad():
        method.rule_left["v"].mul_(2.0)
    for k in method.sites:
        changed = not torch.equal(method.delta_weight(k), before[k])
        assert changed == k.endswith("_v"), k


@pytest.mark.parametrize("config", [{"method": "kadaptation"}, {"method": "kadaptation", "n": 4, "rule_rank": 0}])
def test_kadaptation_starts_at_the_identity_and_trains_every_factor(config) -> None:
    model = build("bert")
    batch = inputs("bert")
    base = logits(model, batch)
    torch.manual_seed(0)
    unipelt.attach(model, config)
    method = deltas(model)["kadaptation"]
    torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    model(**batch).logits.square().sum().backward()
    assert all(v.grad.abs().max() > 0 for v in method.v.values())  # v = 0: only v moves on the first step
    optimizer.step()
    optimizer.zero_grad()
    model(**batch).logits.square().sum().backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name} has a zero gradient after a step"


def test_kadaptation_reference_zero_init_would_not_train() -> None:
    """The released code zeroes both fast factors: every gradient of the Kronecker update is then zero."""
    model = unipelt.attach(build("bert"), "kadaptation")
    method = deltas(model)["kadaptation"]
    with torch.no_grad():
        for u in method.u.values():
            u.zero_()
    model(**inputs("bert")).logits.square().sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in method.parameters())


def test_kadaptation_saves_loads_and_merges_exactly(tmp_path: Path) -> None:
    model = _attached("bert", "kadaptation")
    batch = inputs("bert")
    out = logits(model, batch)
    assert (out - logits(build("bert"), batch)).abs().max() > 1e-4
    unipelt.save(model, tmp_path)
    fresh = build("bert")
    unipelt.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), out, atol=1e-7, rtol=0)
    unipelt.merge(model)
    assert not hasattr(model, "unipelt_deltas")
    torch.testing.assert_close(logits(model, batch), out, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ KronA


def test_krona_docstring_says_there_is_no_reference_code() -> None:
    doc = krona.__doc__
    assert doc.splitlines()[0].startswith("KronA (Edalati et al. 2022)")
    assert "Reference: none in code" in doc and "2212.10650" in doc
    assert kadaptation.__doc__.count("eric-ai-lab/PEViT") == 1

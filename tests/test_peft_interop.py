"""Interop with the ``peft`` library's LoRA format, both ways, compared on logits.

peft -> unipelt: a LoRA made and saved by ``peft`` loads with ``unipelt.load`` (which detects
``adapter_config.json``) and gives peft's logits. unipelt -> peft: ``unipelt.export_peft`` writes a
folder that ``peft.PeftModel.from_pretrained`` loads into the same model, with the same logits.
The LoRA weights and heads are perturbed first (lora_B starts at zero), and the logits are checked
to differ from the base model's, so that agreeing means something.
"""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

import unipelt  # noqa: E402
from conftest import build, inputs, load_with_peft, logits, perturb_  # noqa: E402
from unipelt.core import attachment, deltas  # noqa: E402

# float32 rounding of two orders of the same sums (peft's LoRA path against ours): a few 1e-6 on logits of
# order 1, 1.05e-5 on T5's on one CPU (AMD EPYC); a wrong weight or scale moves them by far more
ATOL, RTOL = 1e-5, 1e-5

PEFT_CASES = {
    # family: (peft target_modules, modules_to_save, fan_in_fan_out)
    "bert": (["query", "value"], ["classifier"], False),
    "gpt2": (["c_attn"], ["score"], True),  # GPT-2's Conv1D stores its weight as (in, out)
    "llama": (["q_proj", "v_proj"], None, False),  # LlamaForCausalLM: no task head
}


def randomize(params, seed: int = 0, scale: float = 0.3) -> None:
    perturb_(params, seed, scale)


def peft_model(name: str, use_rslora: bool = False):
    targets, heads, fan_in_fan_out = PEFT_CASES[name]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=heads,
                             fan_in_fan_out=fan_in_fan_out, use_rslora=use_rslora)
    model = peft.get_peft_model(build(name), config).eval()
    changed = [p for n, p in model.named_parameters() if "lora_B" in n or "modules_to_save" in n]
    assert len(changed) > 0
    randomize(changed)
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_peft_lora_loads_into_unipelt(name, use_rslora, tmp_path):
    reference = peft_model(name, use_rslora)
    batch = inputs(name)
    expected = logits(reference, batch)
    assert (expected - logits(build(name), batch)).abs().max() > 1e-3
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()

    model = unipelt.load(build(name), tmp_path)
    assert list(deltas(model)) == ["lora"]
    lora = deltas(model)["lora"]
    scaling = 8 / 4 ** 0.5 if use_rslora else 8 / 4
    assert lora.scaling == pytest.approx(scaling)
    assert len(lora.sites) == 2 * len(PEFT_CASES[name][0])  # every target in each of two layers
    out = logits(model, batch)
    assert torch.allclose(out, expected, atol=ATOL, rtol=RTOL), (out - expected).abs().max()
    # the head peft trained came along
    heads = PEFT_CASES[name][1] or []
    for head in heads:
        trained = reference.base_model.model.get_submodule(head).modules_to_save["default"]
        for (k, v), (k2, v2) in zip(getattr(model, head).state_dict().items(), trained.state_dict().items(),
                                    strict=True):
            assert k == k2 and torch.equal(v, v2)


EXPORT_CASES = {
    "bert-qv": ("bert", ("q", "v"), ["query", "value"]),
    "gpt2-c_attn": ("gpt2", ("c_attn",), ["c_attn"]),
    "llama-all": ("llama", ("q", "k", "v", "o", "ffn_in", "ffn_out"),
                  ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    "t5-all": ("t5", ("q", "k", "v", "o", "ffn_in", "ffn_out"), ["k", "o", "q", "v", "wi", "wo"]),
    # "dense" also names BERT's attention output and pooler: the export must name the exact modules
    "bert-ffn_out": ("bert", ("ffn_out",), ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_unipelt_lora_exports_to_peft(case, tmp_path):
    name, targets, target_modules = EXPORT_CASES[case]
    model = unipelt.attach(build(name), unipelt.LoRAConfig(r=4, alpha=8, targets=targets))
    state = attachment(model)
    heads = [p for h in state.model_map.head_modules.values() for p in h.parameters()]
    randomize([*deltas(model).parameters(), *heads])
    batch = inputs(name)
    expected = logits(model, batch)
    assert (expected - logits(build(name), batch)).abs().max() > 1e-3

    unipelt.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == target_modules
    assert config["fan_in_fan_out"] == (name == "gpt2")
    assert config["modules_to_save"] == (sorted(state.model_map.head_modules) or None)

    loaded = load_with_peft(name, tmp_path)
    n_lora = sum(1 for n, _ in loaded.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(deltas(model)["lora"].sites)  # peft adapted the same modules, no more
    out = logits(loaded, batch)
    assert torch.allclose(out, expected, atol=ATOL, rtol=RTOL), (out - expected).abs().max()

    # and the folder comes back into unipelt as well
    again = unipelt.load(build(name), tmp_path)
    assert torch.allclose(logits(again, batch), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,config,message", [
    ("bert", unipelt.LoRAConfig(r=4, gate=True), "gated"),
    ("gpt2", unipelt.LoRAConfig(r=4, targets=("q", "v")), "fused"),
    ("bert", {"method": "composition", "methods": [{"method": "lora", "r": 4}, "bitfit"]}, "exactly one LoRA"),
])
def test_export_refuses_what_peft_cannot_express(name, config, message, tmp_path):
    model = unipelt.attach(build(name), config)
    folder = tmp_path / "out"
    with pytest.raises(unipelt.ConfigError, match=message):
        unipelt.export_peft(model, folder)
    assert not (folder / "adapter_config.json").exists()


@pytest.mark.parametrize("config,kind", [
    (lambda: peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[]), "IA3"),
    (lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"), "PREFIX_TUNING"),
])
def test_non_lora_peft_checkpoint_is_refused(config, kind, tmp_path):
    peft.get_peft_model(build("bert"), config()).save_pretrained(tmp_path)
    model = build("bert")
    with pytest.raises(unipelt.DeltaFileError, match=kind):
        unipelt.load(model, tmp_path)
    assert attachment(model) is None and not deltas(model)


@pytest.mark.parametrize("option,message", [
    ({"rank_pattern": {"query": 2}}, "rank_pattern"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa_niter_2"}, "init_lora_weights='pissa_niter_2'"),  # randomised SVD
])
def test_unsupported_peft_lora_options_are_refused(option, message, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **option)
    peft.get_peft_model(build("bert"), config).save_pretrained(tmp_path)
    model = build("bert")
    with pytest.raises(unipelt.DeltaFileError, match=message):
        unipelt.load(model, tmp_path)
    assert attachment(model) is None

"""Our methods compute the ``adapters`` library's function for equal weights: outputs and input gradients.

``adapters`` (adapter-hub/adapters 1.3.0) maintains UniPELT and follows the authors' code for the methods
checked here; it runs in its own environment with its pinned ``transformers`` (``adapters_reference.py``,
the speed benchmark's ``.bench/adapters-env``). Its trainable weights are moved away from their
initialisation, copied into ours by name, and a batch with a padded row goes through both: the real tokens'
final states and the gradient with respect to the input embeddings must agree within 1e-5.

Where ``adapters`` departs from the authors' repository or from padding-invariance, the test says so:

1. It averages UniPELT's gates over every position, padding included, as morningmoni/UniPELT does (which pads
   every batch to 128 tokens); our default averages over the real tokens, so a padded row gives what it gives
   alone. ``gate_pooling="mean_with_padding"`` reproduces the padded batch; the default reproduces each row run
   alone (``"alone"`` below).
2. Its prompt layer widens BERT's 4-D mask on the query axis too, with visible entries
   (``prefix_attention_mask(attention_mask, [2, 3])`` in its ``BertSelfAttention``): the prompt's positions attend
   to the padding, so a padded row's outputs depend on its padding (here by up to 5e-3 with the prompt alone).
   Ours masks the padding for every query; the prompt cases compare each row with adapters' row run alone.
3. Its LoRA gate's bias keeps ``nn.Linear``'s init where UniPELT's ``_init_weights`` zeroes it; the weights are
   copied here, so the function is the same.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import unipelt
from unipelt import core
from unipelt.bench import ensure_adapters_env

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "adapters_reference.py"
_ref_spec = __import__("importlib.util").util.spec_from_file_location("adapters_reference", REFERENCE)
reference = __import__("importlib.util").util.module_from_spec(_ref_spec)
_ref_spec.loader.exec_module(reference)  # its CONFIG and prompt layout; it imports adapters only when run

# case: (adapters configuration: [[class, kwargs], ...], our configuration); ALONE: the cases compared row by row
# with adapters' rows run alone, without padding (points 1 and 2 above)
CASES: dict[str, tuple[list, dict]] = {
    "pfeiffer": ([["SeqBnConfig", {"reduction_factor": 16}]], {"method": "pfeiffer"}),
    "houlsby": ([["DoubleSeqBnConfig", {"reduction_factor": 16}]], {"method": "houlsby"}),
    "parallel": ([["ParBnConfig", {"reduction_factor": 2}]],
                 {"method": "parallel", "bottleneck": 16, "scaling": 4.0}),
    "prefix": ([["PrefixTuningConfig", {"prefix_length": 10, "flat": True}]],
               {"method": "prefix", "length": 10, "reparam": False}),
    "prefix_mlp": ([["PrefixTuningConfig", {"prefix_length": 10, "flat": False, "bottleneck_size": 512}]],
                   {"method": "prefix", "length": 10}),
    "mam": ([["MAMConfig", {}]], {"method": "mam", "adapter": {"bottleneck": 16}}),
    # adapters' Compacter trains no LayerNorms of the body (the reference's, and ours by default, do)
    "compacter": ([["CompacterConfig", {"reduction_factor": 8}]],
                  {"method": "compacter", "bottleneck": 4, "train_layer_norms": False}),
    "compacter++": ([["CompacterPlusPlusConfig", {"reduction_factor": 8}]],
                    {"method": "compacter++", "bottleneck": 4, "train_layer_norms": False}),
    "unipelt": ([["UniPELTConfig", {}]], {"method": "unipelt"}),
    "unipelt_padding": ([["UniPELTConfig", {}]], {"method": "unipelt", "gate_pooling": "mean_with_padding"}),
    # the seed's prompt layer as adapters builds it, after [CLS] or in front of it
    "unipelt+prompt": ([["UniPELTConfig", {}], ["PromptTuningConfig", {"combine": "prefix_after_bos"}]],
                       {"method": "unipelt", "prompt": {"join": "embeddings", "length": 10, "init": "uniform"}}),
    "unipelt+prompt_first": ([["UniPELTConfig", {}], ["PromptTuningConfig", {"combine": "prefix"}]],
                             {"method": "unipelt",
                              "prompt": {"join": "embeddings", "length": 10, "position": "start"}}),
    "prompt": ([["PromptTuningConfig", {"combine": "prefix_after_bos"}]],
               {"method": "prompt", "join": "embeddings", "length": 10, "init": "uniform"}),
}
ALONE = {"unipelt", "unipelt+prompt", "unipelt+prompt_first", "prompt"}


@pytest.fixture(scope="module")
def adapters_env() -> Path:
    target = Path(os.environ.get("UNIPELT_ADAPTERS_ENV", HERE.parent / ".bench" / "adapters-env"))
    env = ensure_adapters_env(target, log=lambda s: None)
    assert env is not None, "pip could not install adapters==1.3.0 with transformers==4.57.6"
    return env


def reference_run(case: str, env: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{case}.pt"
    spec = {"config": CASES[case][0]}
    # the reference computes with as many threads as this process (conftest's one): the same reduction order, so
    # the comparison is not at the mercy of float summation (MAM's input gradient was 7e-7 past 1e-5 otherwise)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(env), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, str(REFERENCE), json.dumps(spec), str(out)], env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------------------------------- weight mapping


def _copy(ours: torch.Tensor, theirs: torch.Tensor, used: set, name: str) -> None:
    assert ours.shape == theirs.shape, f"{name}: ours {tuple(ours.shape)}, theirs {tuple(theirs.shape)}"
    ours.copy_(theirs)
    used.add(name)


def copy_weights(model: torch.nn.Module, delta: dict[str, torch.Tensor]) -> None:
    """Every trainable weight of ``adapters`` into the method of ours that holds it; none may be left over."""
    used: set[str] = set()
    methods = core.deltas(model)
    layer_key = {"encoder.layer.0": "layers0", "encoder.layer.1": "layers1"}
    with torch.no_grad():
        for name, value in delta.items():
            layer = layer_key.get(".".join(name.split(".")[:3]))
            if m := re.search(r"\.(query|value)\.loras\.ref\.(lora_A|lora_B|gate\.weight|gate\.bias)$", name):
                site = f"{layer}_self_{m.group(1)[0]}"
                lora = methods["lora"]
                target = {"lora_A": lora.pairs[site].A.weight, "lora_B": lora.pairs[site].B.weight,
                          "gate.weight": lora.gates[site].proj.weight if site in lora.gates else None,
                          "gate.bias": lora.gates[site].proj.bias if site in lora.gates else None}[m.group(2)]
                _copy(target, value, used, name)
            elif m := re.search(r"prefix_gates\.ref\.(weight|bias)$", name):
                _copy(getattr(methods["prefix"].gates[f"{layer}_self"].proj, m.group(1)), value, used, name)
            elif m := re.search(r"self_prefix\.(wte\.weight|control_trans(\.\d)?(\.weight|\.bias)?)$", name):
                prefix = methods["prefix"]
                if m.group(1) == "wte.weight":
                    target = prefix.embedding
                elif m.group(1) == "control_trans":  # the flat prefix, one vector laid out as our table
                    target, value = prefix.table, value.reshape(prefix.table.shape)
                else:
                    target = getattr(prefix.mlp[int(m.group(2)[1:])], m.group(3)[1:])
                _copy(target, value, used, name)
            elif m := re.search(r"(attention\.output|\.output)\.adapters\.ref\.(.+)$", name):
                site = f"{layer}_self_attn" if m.group(1) == "attention.output" else f"{layer}_ffn"
                method = next(v for k, v in methods.items() if k in ("adapter", "compacter") and site in v.sites)
                _copy_bottleneck(method, site, m.group(2), value, used, name)
            elif m := re.search(r"shared_parameters\.ref\.phm_rule$", name):
                _copy(methods["compacter"].rules, value.transpose(-1, -2), used, name)
            elif name.endswith("prompt_tunings.ref.prompt_embedding.weight"):
                _copy(methods["prompt"].embedding, value, used, name)
    assert used == set(delta), f"adapters weights left unmapped: {sorted(set(delta) - used)[:4]}"


def _copy_bottleneck(method, site: str, part: str, value: torch.Tensor, used: set, name: str) -> None:
    if part.startswith("gate."):
        return _copy(getattr(method.gates[site].proj, part[5:]), value, used, name)
    bottleneck = method.adapters[site]
    which = "down" if part.startswith("adapter_down") else "up"
    leaf = part.rsplit(".", 1)[1]
    layer = getattr(bottleneck, which)
    if leaf in ("weight", "bias"):
        return _copy(getattr(layer, leaf), value, used, name)
    # a PHM layer: adapters' y = x H + b with H = sum_i rule_i (x) (W_left_i W_right_i) of shape (in, out); ours
    # y = x W^T + b, W = sum_i A_i (x) (s_i t_i): A_i = rule_i^T (the shared rules), s_i = W_right_i^T, t_i = W_left_i^T
    if leaf == "b":
        return _copy(layer.bias, value, used, name)
    return _copy(layer.s if leaf == "W_right" else layer.t, value.transpose(-1, -2), used, name)


# --------------------------------------------------------------------------------------------- our side


def ours(case: str, dumped: dict) -> torch.nn.Module:
    config = transformers.BertConfig(**reference.CONFIG)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(dumped["base"], strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    unipelt.attach(model, CASES[case][1])
    copy_weights(model, dumped["delta"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(v.numel() for v in dumped["delta"].values())
    return model.eval()


def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    directions = reference.directions
    rows = slice(None)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    states = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    direction = directions(states.shape[-1])[rows, : states.shape[1]]
    (states * direction * mask[..., None]).sum().backward()
    return {"states": states.detach(), "grad": embeds.grad.detach()}


def assert_same(mine: dict, theirs: dict, mask: torch.Tensor, what: str) -> None:
    keep = mask.bool()
    torch.testing.assert_close(mine["states"][keep], theirs["states"][keep], rtol=1e-5, atol=1e-5, msg=what)
    torch.testing.assert_close(mine["grad"][keep], theirs["grad"][keep], rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_input_gradients_equal_adapters(case: str, adapters_env: Path, tmp_path: Path) -> None:
    dumped = reference_run(case, adapters_env, tmp_path)
    model = ours(case, dumped)
    ids, mask = dumped["input_ids"], dumped["attention_mask"]
    bare = transformers.BertModel(transformers.BertConfig(**reference.CONFIG), add_pooling_layer=False).eval()
    bare.load_state_dict(dumped["base"], strict=False)
    plain = run(bare, ids, mask)
    assert (plain["states"] - dumped["batch"]["states"])[mask.bool()].abs().max() > 1e-3  # the delta acts
    mine = run(model, ids, mask)
    if case not in ALONE:  # the same function over the padded batch as adapters
        assert_same(mine, dumped["batch"], mask, f"{case}: the padded batch")
        return
    # each row, padded or not, gives what adapters gives it alone, without padding
    for row, alone in enumerate(dumped["alone"]):
        real = int(mask[row].sum())
        assert_same({k: v[row:row + 1, :real] for k, v in mine.items()}, alone, mask[row:row + 1, :real],
                    f"{case}: row {row}")
    padded = dumped["batch"]["states"][-1, : int(mask[-1].sum())]
    assert (padded - dumped["alone"][-1]["states"][0]).abs().max() > 1e-6  # adapters' padded row reads its padding

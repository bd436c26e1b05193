"""New architectures without editing the library, and the target forms every targeted method takes.

``TinyNet`` below is a small pre-LN transformer written here, an ``nn.Module`` with no ``transformers`` config and in
no table: its layers are described once with ``unipelt.Family`` and given to ``attach``. A delta trained on it is
saved and reloaded in a fresh interpreter that never saw the row (it comes from ``unipelt.json``), with equal
outputs. On the tiny BERT and LLaMA models, ``"all-linear"``, ``"re:"`` patterns, ``layers`` and ``exclude`` select
exactly the expected modules, and ``unipelt.plan`` lists exactly what ``attach`` then hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unipelt
from conftest import build
from unipelt import families

VOCAB, D, LAYERS, CLASSES = 50, 16, 3, 3


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape

        def split(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        keep = None if mask is None else mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)), split(self.wv(x)), attn_mask=keep)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), Attention(d, 4), nn.LayerNorm(d), MLP(d, 2 * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyNet(nn.Module):
    """A classifier over token ids: embeddings, pre-LN blocks, mean pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(D) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.head(self.norm(x).mean(1))


# the row: where TinyNet keeps its layers, attention projections, FFN and norms (paths from the model itself)
TINY = unipelt.Family(
    name="tinynet",
    model_types=("TinyNet",),  # no transformers config: matched against the class name
    stacks=(unipelt.Stack(
        name="layers", layers="blocks",
        attentions=(unipelt.Attention("self", module="attn", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo"),),
        ffn_in=("mlp.fc_in",), ffn_out="mlp.fc_out", activation="mlp.act", ffn_norm="norm2", norm_first=True),),
    heads=("head",),
)

CONFIG = {"method": "composition", "methods": [
    {"method": "lora", "r": 2, "targets": ["all-linear"], "exclude": ["o"], "layers": [0, 2]},
    {"method": "adapter", "bottleneck": 4, "init": "lora"}, "ia3"]}  # each starts at the base model


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[-1, -2:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (3, 6), generator=g), "attention_mask": mask}


def train_step(model: nn.Module) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    for _ in range(2):
        loss = F.cross_entropy(model(**batch()), torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def hooked(model: nn.Module) -> dict[str, set[str]]:
    """Per attached method, the paths of the modules its installer hooked."""
    state = model.__dict__["_unipelt"]
    paths = {id(m): p for p, m in model.named_modules()}
    return {name: {paths[id(m)] for m, _ in inst.hooked} for name, inst in state.installers.items()}


def planned(plan: unipelt.Plan) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for site in plan:
        if site.kind not in ("head", "call"):
            out.setdefault(site.method, set()).add(site.path)
    return out


def test_custom_model_trains_saves_and_reloads_in_a_fresh_interpreter(tmp_path: Path) -> None:
    model = tiny()
    with pytest.raises(unipelt.UnsupportedModelError, match="unipelt.Family"):
        unipelt.attach(tiny(), "lora")  # in no table, not registered
    base_out = model(**batch())
    plan = unipelt.plan(model, CONFIG, family=TINY)
    unipelt.attach(model, CONFIG, family=TINY)
    assert torch.allclose(model(**batch()), base_out, atol=1e-6)  # every delta starts at the base model
    assert hooked(model) == planned(plan)
    assert {s.path for s in plan.of("lora")} == {f"blocks.{i}.{p}" for i in (0, 2) for p in
                                                  ("attn.wq", "attn.wk", "attn.wv", "mlp.fc_in", "mlp.fc_out")}
    assert [s.path for s in plan if s.kind == "head"] == ["head"]
    train_step(model)
    out = model(**batch())
    assert not torch.allclose(out, base_out, atol=1e-4)
    folder = unipelt.save(model, tmp_path / "delta")
    meta = json.loads((folder / "unipelt.json").read_text())
    assert meta["base_model"]["family"] == "tinynet" and meta["base_model"]["family_row"]["stacks"][0]["layers"] \
        == "blocks"
    torch.save(out, tmp_path / "expected.pt")

    # a fresh interpreter: TinyNet's code is importable, the row was never registered there
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import unipelt, test_custom_family as t
        from unipelt import families
        assert not families._REGISTERED
        model = t.tiny()
        unipelt.load(model, {str(folder)!r})
        assert model.__dict__["_unipelt"].model_map.family.name == "tinynet"
        torch.save(model(**t.batch()), {str(tmp_path / "reloaded.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "reloaded.pt"), out, atol=1e-6)

    unipelt.detach(model)  # the base model back exactly
    assert torch.allclose(model(**batch()), base_out, atol=0)


def test_registered_family_and_prefix_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(unipelt.ConfigError, match="already has"):
        unipelt.register_family(unipelt.Family("bert", ("TinyNet",), TINY.stacks))
    unipelt.register_family(TINY)
    try:
        model = unipelt.attach(tiny(), {"method": "lora", "targets": ["re:blocks\\.1\\.attn\\.w[qv]"]})
        assert {s.path for s in unipelt.plan(tiny(), "ln")} >= {"blocks.0.norm1", "blocks.2.norm2"}
        assert set(hooked(model)["lora"]) == {"blocks.1.attn.wq", "blocks.1.attn.wv"}
        train_step(model)
        folder = unipelt.save(model, tmp_path / "d")
    finally:
        families.unregister_family("tinynet")
    fresh = unipelt.load(tiny(), folder)  # the row comes from unipelt.json
    assert torch.allclose(fresh(**batch()), model(**batch()), atol=1e-6)
    with pytest.raises(unipelt.ConfigError, match="prefix-style methods do not support.*no transformers config"):
        unipelt.attach(tiny(), "prefix", family=TINY)
    with pytest.raises(unipelt.ConfigError, match="ffn_out must be a module path"):
        unipelt.attach(tiny(), "lora", family=unipelt.Family("bad", "TinyNet", unipelt.Stack(
            "layers", "blocks", (), "mlp.fc_in", "", "mlp.act")))
    with pytest.raises(unipelt.UnsupportedModelError, match="expected a linear module at 'blocks.0.mlp.nope'"):
        unipelt.attach(tiny(), "lora", family=unipelt.Family("bad", "TinyNet", unipelt.Stack(
            "layers", "blocks", TINY.stacks[0].attentions, "mlp.fc_in", "mlp.nope", "mlp.act")))
    assert not families._REGISTERED


BERT_LAYER = "bert.encoder.layer.{}."
BERT_LINEAR = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"]
LLAMA_LAYER = "model.layers.{}."
LLAMA_LINEAR = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]


def paths(layer: str, names: list[str], layers=(0, 1)) -> list[str]:
    return [layer.format(i) + n for i in layers for n in names]


@pytest.mark.parametrize("name,targets,extra,expected", [
    ("bert", ["all-linear"], {}, paths(BERT_LAYER, BERT_LINEAR)),  # no classifier, no pooler
    ("bert", ["all-linear"], {"layers": [1], "exclude": ["ffn_in", "o"]},
     paths(BERT_LAYER, ["attention.self.query", "attention.self.key", "attention.self.value", "output.dense"], [1])),
    ("bert", ["re:.*\\.attention\\.self\\.(query|value)"], {"layers": [0]},
     paths(BERT_LAYER, ["attention.self.query", "attention.self.value"], [0])),
    ("bert", ["q", "dense"], {"exclude": ["re:.*(pooler|intermediate).*", "attention.output.dense"]},
     paths(BERT_LAYER, ["attention.self.query"]) + paths(BERT_LAYER, ["output.dense"])),
    ("llama", ["all-linear"], {}, paths(LLAMA_LAYER, LLAMA_LINEAR)),  # no lm_head
    ("llama", ["all-linear"], {"exclude": ["re:.*mlp.*"], "layers": [1]},
     paths(LLAMA_LAYER, LLAMA_LINEAR[:4], [1])),
    ("llama", ["re:model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj", "v"], {"exclude": ["re:model\\.layers\\.0\\..*"]},
     paths(LLAMA_LAYER, ["mlp.gate_proj", "mlp.up_proj"], [1]) + paths(LLAMA_LAYER, ["self_attn.v_proj"], [1])),
])
def test_target_forms_select_exactly(name: str, targets: list[str], extra: dict, expected: list[str]) -> None:
    config = {"method": "lora", "r": 2, "targets": targets, **extra}
    plan = unipelt.plan(build(name), config, train_head=False)
    assert [s.path for s in plan] == expected
    model = unipelt.attach(build(name), config)
    assert hooked(model) == planned(plan)
    assert sorted(p.path for p in model.unipelt_deltas["lora"].sites.values()) == sorted(expected)
    folder_config = unipelt.parse_config(model.unipelt_deltas["lora"].config.to_dict())  # round-trips
    assert folder_config.layers == (tuple(extra["layers"]) if "layers" in extra else None)


@pytest.mark.parametrize("name,config", [
    ("bert", "unipelt"), ("llama", "unipelt"), ("bert", "mam"),
    ("llama", {"method": "composition", "methods": [
        {"method": "krona", "a_out": 4, "a_in": 4, "targets": ["all-linear"], "exclude": ["ffn_in", "ffn_out"]},
        "ia3", "ln"]}),
    ("bert", {"method": "composition", "methods": ["bitfit", "prompt", {"method": "lora", "targets": ["o"]}]}),
    ("bert", {"method": "poly", "targets": ["all-linear"], "layers": [1], "tasks": 1}),
    ("llama", {"method": "kadaptation", "n": 4, "targets": ["q", "re:.*o_proj"], "layers": [0]}),
])
def test_plan_lists_what_attach_hooks(name: str, config) -> None:
    plan = unipelt.plan(build(name), config)
    model = unipelt.attach(build(name), config)
    assert hooked(model) == planned(plan)
    assert set(plan.paths) == set().union(*planned(plan).values()) | {s.path for s in plan if s.kind in
                                                                       ("head", "call")}
    assert "module" in str(plan).splitlines()[0]
    # planning on an attached model names the next method as attach would, and leaves the model as it was
    again = unipelt.plan(model, {"method": "lora", "targets": ["q"]}, train_head=False)
    assert {s.method for s in again} == {"lora_1" if "lora" in hooked(model) else "lora"}
    assert hooked(model) == planned(plan)


@pytest.mark.parametrize("config,message", [
    ({"method": "lora", "targets": ["re:.*nothing"]}, r"matches no linear module.*paths such as \['bert\.encoder"),
    ({"method": "lora", "targets": ["q"], "exclude": ["k"]}, "removes none of the 2 sites"),
    ({"method": "lora", "targets": ["q"], "layers": [2]}, r"layers \[2\] are not layers.*0\.\.1"),
    ({"method": "lora", "targets": ["q", "re:.*query"]}, "twice"),
    ({"method": "lora", "targets": ["q"], "exclude": ["q"]}, "leave no site"),
    ({"method": "lora", "targets": ["re:("]}, "not a valid regular expression"),
    ({"method": "lora", "layers": [-1]}, "layer indices >= 0"),
    ({"method": "lora", "layers": ["0"]}, "list of integers"),
])
def test_target_errors_are_one_line_with_the_fix(config: dict, message: str) -> None:
    model = build("bert")
    with pytest.raises((unipelt.ConfigError, unipelt.UnsupportedModelError), match=message) as err:
        unipelt.plan(model, config)
    assert "\n" not in str(err.value)
    with pytest.raises(type(err.value)):
        unipelt.attach(model, config)
    assert "unipelt_deltas" not in model._modules

"""Poly and ATTEMPT compute and train as their authors' code does (issue 26, points 2 and 6).

- Poly (microsoft/mttl ``mttl/models/poly.py``, ``mttl/config.py``): LoRA skills of rank 16 scaled by 1 / r on
  W_q, W_k, W_v and W_o, one routing matrix per adapted projection, the routing logits in an optimizer group
  of their own at 0.1 (``--part-lr poly.routing=LR`` overrides it), the inventory at 1e-3;
- ATTEMPT (AkariAsai/ATTEMPT ``modeling_t5.py``, ``run_seq2seq.py``, its configs): prompts of length 100, each
  target prompt starting as the first source prompt, one target prompt per task chosen by ``task_ids`` with
  one shared attention module (multi-task training through ``--task a,b``), learning rate 0.3.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import build, inputs, logits, perturb_
from unipelt.core import deltas
from unipelt.methods.attempt import AttemptConfig
from unipelt.methods.poly import PolyConfig
from unipelt.train import loop

DATA = Path(os.environ.get("UNIPELT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
GLUE = DATA / "glue"

# ------------------------------------------------------------------------------------------------------ Poly


def test_poly_defaults_are_mttls() -> None:
    cfg = PolyConfig()
    assert (cfg.skills, cfg.r, cfg.heads) == (8, 16, 1)
    assert cfg.alpha / cfg.r == 1 / 16  # the reference's adapter_out = x A B / rank
    assert tuple(cfg.targets) == ("q", "k", "v", "o")
    assert PolyConfig.reference_lr == 1e-3 and loop.default_lr("poly", cfg) == 1e-3
    assert loop.default_lr("poly_s", unipelt.config.parse_config("poly_s")) == 1e-3


def test_poly_has_one_routing_matrix_per_adapted_projection() -> None:
    model = build("bert")
    torch.manual_seed(0)
    unipelt.attach(model, {"method": "poly", "tasks": 3})
    poly = deltas(model)["poly"]
    layers = model.config.num_hidden_layers
    assert len(poly.sites) == 4 * layers  # q, k, v, o of every layer
    assert sorted(poly.routing) == sorted(poly.sites)
    for z in poly.routing.values():
        assert z.shape == (3, 1, 8)
        assert z.abs().max() <= 1e-3 and z.abs().max() > 0  # mttl: uniform in +-1e-3
    for site_key, proj in poly.sites.items():
        assert poly.A[site_key].shape == (8, 16, proj.in_features)
        assert poly.A[site_key].abs().max() <= 1 / math.sqrt(3 * proj.in_features)  # gain(sqrt 5) / sqrt(d_in)
        assert not poly.B[site_key].any()
    d = model.config.hidden_size
    assert unipelt.trainable_parameters(model)["poly"] == 4 * layers * (8 * 16 * (d + d) + 3 * 1 * 8)
    # each projection routes on its own: one matrix's logits change its projection's output only
    value = next(k for k, p in poly.sites.items() if p.path.endswith("layer.1.attention.self.value"))
    outputs = {}
    for site_key, proj in poly.sites.items():
        proj.module.register_forward_hook(lambda m, args, out, key=site_key: outputs.__setitem__(key, out.detach()))
    perturb_(poly.B.parameters(), 3, 0.3)
    batch = {**inputs("bert"), "task_ids": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        for z in poly.routing.values():
            z.zero_()
        model(**batch)
        before = dict(outputs)
        poly.routing[value][0, 0, 0] = 8.0
        model(**batch)
    changed = {k for k in poly.sites if not torch.equal(outputs[k], before[k])}
    assert changed == {value, value.replace("_v", "_o")}  # W_o reads the changed values (the next projection)
    assert torch.equal(outputs[value][1:], before[value][1:])  # the other tasks' rows


def test_routing_logits_train_in_their_own_group_at_point_one() -> None:
    model = build("bert")
    unipelt.attach(model, {"method": "poly_s", "tasks": 2})
    poly = deltas(model)["poly"]
    routing = {id(p) for p in poly.routing.values()}
    groups, by_part = loop.parameter_groups(model, 1e-3, {})
    (own,) = [g for g in groups if {id(p) for p in g["params"]} & routing]
    assert {id(p) for p in own["params"]} == routing and own["lr"] == 0.1
    assert by_part == {"poly.routing": 0.1}
    rest = [g for g in groups if g is not own]
    assert all(g["lr"] == 1e-3 for g in rest)
    assert {id(p) for g in rest for p in g["params"]} >= {id(p) for p in [*poly.A.values(), *poly.B.values()]}
    groups, by_part = loop.parameter_groups(model, 1e-3, {"poly.routing": 0.05})
    (own,) = [g for g in groups if {id(p) for p in g["params"]} & routing]
    assert own["lr"] == 0.05 and by_part == {"poly.routing": 0.05}
    # Poly-mu has no routing to train: one group
    mu = unipelt.attach(build("bert"), {"method": "poly_mu"})
    groups, by_part = loop.parameter_groups(mu, 1e-3, {})
    assert len(groups) == 1 and by_part == {}


@pytest.mark.parametrize("method", ["poly", "poly_s", "poly_mu"])
def test_equal_routing_is_the_mean_skill_lora_at_scale_one_over_r(method: str) -> None:
    """With every skill weighted alike, each adapted projection computes W x + (1 / 16) mean_k(B_k) mean_k(A_k) x,
    whatever the task: written out here on the base model's weights."""
    model = build("bert")
    torch.manual_seed(0)
    unipelt.attach(model, {"method": method, "tasks": 2})
    poly = deltas(model)["poly"]
    perturb_([*poly.A.values(), *poly.B.values()], 4, 0.3)
    with torch.no_grad():
        for z in poly.routing.values():
            z.fill_(0.7)  # equal logits: equal weights in eval mode
    reference = copy.deepcopy(build("bert")).eval()
    q_k_v_o = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    with torch.no_grad():
        for i, layer in enumerate(reference.bert.encoder.layer):
            for path in q_k_v_o:
                site = next(k for k, p in poly.sites.items() if p.path == f"bert.encoder.layer.{i}.{path}")
                a_mean, b_mean = poly.A[site].mean(0), poly.B[site].mean(0)  # (16, d_in), (d_out, 16)
                layer.get_submodule(path).weight += (1 / 16) * b_mean @ a_mean
    batch = inputs("bert")
    expected = logits(reference, batch)
    for ids in ([0, 1, 0], [1, 1, 1]):
        torch.testing.assert_close(logits(model, {**batch, "task_ids": torch.tensor(ids)}), expected,
                                   atol=2e-5, rtol=1e-4)


def test_poly_save_load_is_exact(tmp_path: Path) -> None:
    model = build("llama")
    torch.manual_seed(0)
    unipelt.attach(model, {"method": "poly_s", "tasks": 3, "heads": 2})
    perturb_(deltas(model).parameters(), 5, 0.3)
    new = deltas(model)["poly"].add_task()
    batch = {**inputs("llama"), "task_ids": torch.tensor([new, 0, 2])}
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    fresh = unipelt.load(build("llama"), tmp_path)
    assert sorted(deltas(fresh)["poly"].routing) == sorted(deltas(model)["poly"].routing)
    assert torch.equal(logits(fresh, batch), out)


# --------------------------------------------------------------------------------------------------- ATTEMPT


def _sources(folder: Path, count: int = 2, length: int = 3, family: str = "bert") -> list[str]:
    """Prompt deltas of ``count`` source tasks (random prompts stand in for trained ones)."""
    out = []
    for i in range(count):
        model = build(family)
        torch.manual_seed(10 + i)
        unipelt.attach(model, {"method": "prompt", "length": length, "init": "random"})
        with torch.no_grad():
            deltas(model)["prompt"].embedding.normal_(0, 1.0)
        out.append(str(unipelt.save(model, folder / f"source{i}")))
    return out


def _attempt(sources: list[str], family: str = "bert", **extra) -> torch.nn.Module:
    model = build(family)
    torch.manual_seed(0)
    return unipelt.attach(model, {"method": "attempt", "length": 3, "sources": sources, "attention_hidden": 8,
                                  **extra})


def test_attempt_defaults_are_the_references(tmp_path: Path) -> None:
    cfg = AttemptConfig(n_sources=1)
    assert cfg.length == 100 and cfg.attention_hidden == 100 and cfg.tasks == 1
    assert AttemptConfig.reference_lr == 0.3 and loop.default_lr("attempt", cfg) == 0.3
    # default length: the sources must be prompts of 100 tokens; the target starts as the first of them (on the
    # tiny LLaMA: its rotary positions take a prompt of any length, the tiny BERT's 64 learned ones refuse 100)
    sources = _sources(tmp_path, length=100, family="llama")
    model = unipelt.attach(build("llama"), {"method": "attempt", "sources": sources})
    attempt = deltas(model)["attempt"]
    assert attempt.embedding.shape == (1, 100, 32)
    assert torch.equal(attempt.embedding[0], attempt.sources[0])
    # trainable, as the reference's: the target prompt, W_down and W_up (no biases, the LayerNorm frozen)
    assert {n for n, p in attempt.named_parameters() if p.requires_grad} == {"embedding", "down.weight", "up.weight"}
    assert unipelt.trainable_parameters(model)["attempt"] == 100 * 32 + 2 * 32 * 100


def test_every_target_prompt_starts_as_the_first_source(tmp_path: Path) -> None:
    sources = _sources(tmp_path, count=3)
    attempt = deltas(_attempt(sources, tasks=3))["attempt"]
    assert attempt.embedding.shape == (3, 3, 32)
    for t in range(3):
        assert torch.equal(attempt.embedding[t], attempt.sources[0])
    assert not torch.equal(attempt.sources[0], attempt.sources[1])
    zero = deltas(_attempt(sources, target_init="zero"))["attempt"]
    assert not zero.embedding.any()


def test_attempt_prompt_is_the_papers_formula(tmp_path: Path) -> None:
    """P(x) = P_t + sum_j a_j P_j over the sources and P_t, a = softmax(h . maxpool(P_j) / (d e)),
    h = LayerNorm(W_up SiLU(W_down maxpool(x))): written out here, for rows of different tasks."""
    model = _attempt(_sources(tmp_path), tasks=2)
    attempt = deltas(model)["attempt"]
    perturb_(attempt.parameters(), 2, 0.5)
    x = torch.randn(3, 5, 32)
    ids = torch.tensor([1, 0, 1])
    attempt.context.task_ids = ids
    with torch.no_grad():
        got = attempt.row_prompts(x, None)
        for row in range(3):
            target = attempt.embedding[ids[row]]
            prompts = [*attempt.sources, target]
            pooled = x[row].max(0).values
            h = F.layer_norm(attempt.up.weight @ F.silu(attempt.down.weight @ pooled), (32,))
            scores = torch.stack([h @ p.max(0).values for p in prompts]) / (32 * math.e)
            a = torch.softmax(scores, 0)
            expected = target + sum(a_j * p for a_j, p in zip(a, prompts, strict=True))
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
    attempt.context.task_ids = None


def test_rows_of_different_tasks_get_their_own_target_prompt(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    model = _attempt(sources, tasks=3)
    attempt = deltas(model)["attempt"]
    perturb_(attempt.parameters(), 6, 0.5)
    batch = inputs("bert")  # the last row is padded
    mixed = [2, 0, 1]
    together = logits(model, {**batch, "task_ids": torch.tensor(mixed)})
    for row, task in enumerate(mixed):
        real = int(batch["attention_mask"][row].sum())
        alone = logits(model, {**{k: v[row:row + 1, :real] for k, v in batch.items()},
                               "task_ids": torch.tensor([task])})
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)
    same = [logits(model, {**batch, "task_ids": torch.full((3,), t)}) for t in range(3)]
    assert (same[0] - same[1]).abs().max() > 1e-5 and (same[1] - same[2]).abs().max() > 1e-5
    with pytest.raises(unipelt.ConfigError, match="attempt holds target prompts of 3 tasks: pass task_ids="):
        logits(model, batch)
    with pytest.raises(unipelt.ConfigError, match="do not fit a batch of 3 rows and 3 attempt tasks"):
        logits(model, {**batch, "task_ids": torch.tensor([0, 3, 1])})
    # save/load exact, without the source folders
    unipelt.save(model, tmp_path / "attempt")
    for folder in sources:
        for f in Path(folder).iterdir():
            f.unlink()
    fresh = unipelt.load(build("bert"), tmp_path / "attempt")
    assert deltas(fresh)["attempt"].config.tasks == 3
    assert torch.equal(logits(fresh, {**batch, "task_ids": torch.tensor(mixed)}), together)


def test_one_task_attempt_needs_no_task_ids(tmp_path: Path) -> None:
    model = _attempt(_sources(tmp_path))
    perturb_(deltas(model)["attempt"].parameters(), 6, 0.5)
    batch = inputs("bert")
    torch.testing.assert_close(logits(model, batch), logits(model, {**batch, "task_ids": torch.zeros(3).long()}),
                               atol=0, rtol=0)


# ------------------------------------------------------------------------------------- multi-task training


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from test_cli import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def small_glue(tmp_path_factory) -> Path:
    if not (GLUE / "SST-2" / "train.tsv").exists():
        pytest.skip(f"GLUE data not found in {GLUE} (set UNIPELT_DATA_DIR)")
    out = tmp_path_factory.mktemp("glue")
    for name in ("SST-2", "RTE"):
        (out / name).mkdir()
        for f in (GLUE / name).glob("*.tsv"):
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
            (out / name / f.name).write_text("".join(lines[:121]), encoding="utf-8")
    return out


def test_attempt_trains_several_tasks_at_once(tiny_model: str, small_glue: Path, tmp_path: Path) -> None:
    """`--task sst2,rte --method attempt`: one shared attention module, one target prompt per task (both
    starting as the first source), trained on mixed batches at the reference's 0.3; eval reproduces the run."""
    from transformers import AutoModelForSequenceClassification

    sources = []
    for i in range(2):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
        torch.manual_seed(20 + i)
        unipelt.attach(model, {"method": "prompt", "length": 4, "init": "random"})
        sources.append(str(unipelt.save(model, tmp_path / f"source{i}")))
    out = tmp_path / "attempt"
    results = loop.run(loop.RunConfig(
        task="sst2,rte", method="attempt", model=tiny_model, data_dir=str(small_glue), out=str(out), k_shot=16,
        max_steps=6, eval_every=3, batch_size=8, max_length=32, device="cpu", progress=False,
        method_options={"length": 4, "attention_hidden": 8, "sources": sources}), log=lambda s: None)
    assert results["lr"] == 0.3 and results["main_metric"] == "mean"
    assert results["trainable_by_part"]["attempt"] == 2 * 4 * 32 + 2 * 32 * 8
    saved = json.loads((out / "unipelt.json").read_text())["methods"][0]["config"]
    assert saved["method"] == "attempt" and saved["tasks"] == 2 and saved["n_sources"] == 2
    fresh = unipelt.load(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2), out)
    attempt = deltas(fresh)["attempt"]
    first = attempt.sources[0]
    moved = [(attempt.embedding[t] - first).abs().max() for t in range(2)]
    assert all(m > 1e-3 for m in moved)  # each task's prompt trained on its own rows
    assert (attempt.embedding[0] - attempt.embedding[1]).abs().max() > 1e-3
    assert loop.evaluate(out, device="cpu") == pytest.approx(results["metrics"])

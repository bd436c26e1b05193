"""Polytropon / Poly-S / Poly-mu: an inventory of LoRA skills routed per task (task_ids per row)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import unipelt
from conftest import VOCAB, build, inputs, logits, perturb_
from unipelt.core import deltas

CONFIGS = {"poly": {"method": "poly", "tasks": 3}, "poly_s": {"method": "poly_s", "tasks": 3, "heads": 2},
           "poly_mu": {"method": "poly_mu", "tasks": 3}}


def _attached(family: str, key: str, seed: int = 0):
    model = build(family)
    torch.manual_seed(seed)
    unipelt.attach(model, dict(CONFIGS[key]))
    return model


def _perturb(model, seed: int = 5) -> None:
    perturb_(deltas(model).parameters(), seed, 0.3)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_rows_follow_their_task(family: str, key: str) -> None:
    model = _attached(family, key)
    batch = inputs(family)
    base = logits(build(family), batch)
    torch.testing.assert_close(logits(model, {**batch, "task_ids": torch.tensor([0, 1, 2])}), base,
                               atol=1e-6, rtol=0)  # B = 0: the base model, whatever the routing
    _perturb(model)
    alone = [logits(model, {**batch, "task_ids": torch.full((3,), t)}) for t in range(3)]
    mixed = [2, 0, 1]
    out = logits(model, {**batch, "task_ids": torch.tensor(mixed)})
    for row, task in enumerate(mixed):
        torch.testing.assert_close(out[row], alone[task][row], atol=1e-5, rtol=0)
    differs = (alone[0] - alone[1]).abs().max() > 1e-7  # Poly-mu: exactly equal
    assert differs == (key != "poly_mu")  # every task uses the inventory average


def test_routing_is_sampled_while_training_and_fixed_in_eval() -> None:
    model = _attached("bert", "poly")
    _perturb(model)
    batch = {**inputs("bert"), "task_ids": torch.tensor([0, 1, 2])}
    assert torch.equal(logits(model, batch), logits(model, batch))
    model.train()
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert not torch.equal(a, b)  # relaxed Bernoulli samples of the skill allocation


@pytest.mark.parametrize("key", list(CONFIGS))
def test_count_and_save_load(key: str, tmp_path: Path) -> None:
    model = _attached("bert", key)
    cfg = deltas(model)["poly"].config
    d, layers, k, r = 32, 2, cfg.skills, cfg.r
    inventory = layers * 4 * k * r * (d + d)  # W_q, W_k, W_v, W_o of each layer: skills r (d_in + d_out)
    routing = 0 if key == "poly_mu" else layers * 4 * 3 * cfg.heads * k  # per adapted matrix: tasks heads skills
    assert unipelt.trainable_parameters(model)["poly"] == inventory + routing
    _perturb(model)
    new_task = deltas(model)["poly"].add_task()
    assert new_task == 3
    batch = {**inputs("bert"), "task_ids": torch.tensor([3, 0, 2])}
    out = logits(model, batch)
    unipelt.save(model, tmp_path)
    fresh = unipelt.load(build("bert"), tmp_path)
    assert deltas(fresh)["poly"].config.tasks == 4
    assert torch.equal(logits(fresh, batch), out)


def _two_tasks(n: int = 24):
    """The same n inputs twice: task 0 labels them by whether more tokens come from the upper half of the
    vocabulary, task 1 the opposite way."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, 8), generator=g)
    ids[:, 0] = 2
    rule = ((ids[:, 1:] > VOCAB // 2).sum(1) > 3).long()
    return torch.cat([ids, ids]), torch.cat([rule, 1 - rule]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


def _train(model, steps: int = 80, lr: float = 2e-2, task_ids=None, labels=None) -> float:
    """Full-batch AdamW on the two tasks (or on ``labels`` with ``task_ids``); the final loss in eval mode."""
    ids, default_labels, default_tasks = _two_tasks()
    tasks = default_tasks if task_ids is None else task_ids
    labels = default_labels if labels is None else labels
    routed = {"task_ids": tasks} if "poly" in deltas(model) else {}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(input_ids=ids, **routed).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(input_ids=ids, **routed).logits, labels))


def _frozen_head_model():
    model = build("bert")
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    return model


def _poly_with_disjoint_skills():
    """Two tasks routed to disjoint halves of a 4-skill inventory (routing logits +-6)."""
    torch.manual_seed(0)
    model = unipelt.attach(_frozen_head_model(), {"method": "poly", "tasks": 2, "skills": 4, "r": 4},
                           train_head=False)
    with torch.no_grad():
        for z in deltas(model)["poly"].routing.values():
            z.copy_(torch.tensor([[[6.0, 6.0, -6.0, -6.0]], [[-6.0, -6.0, 6.0, 6.0]]]))
    return model


def test_routing_lets_one_inventory_serve_conflicting_tasks() -> None:
    """Two tasks with opposite labels on the same inputs: one shared LoRA cannot beat ln 2; an inventory whose
    skills the tasks reach through different routes fits both. The routing itself learns (it moves)."""
    torch.manual_seed(0)
    lora = unipelt.attach(_frozen_head_model(), {"method": "lora", "r": 16}, train_head=False)
    lora_loss = _train(lora)
    assert lora_loss > 0.69  # every input has both labels: it can only split the difference
    poly = _poly_with_disjoint_skills()
    routing = {k: v.detach().clone() for k, v in deltas(poly)["poly"].routing.items()}
    poly_loss = _train(poly)
    assert poly_loss < lora_loss - 0.15
    assert any(not torch.equal(v, deltas(poly)["poly"].routing[k]) for k, v in routing.items())


def test_new_task_adapts_through_the_routing_alone() -> None:
    """Few-shot adaptation: a new task's routing row (uniform) over the frozen inventory; only the routing
    trains, and it finds the skills of the task it resembles."""
    model = _poly_with_disjoint_skills()
    _train(model)
    poly = deltas(model)["poly"]
    new = poly.add_task()
    poly.train_routing_only()
    inventory = {k: v.detach().clone() for k, v in [*poly.A.items(), *poly.B.items()]}
    ids, labels, _ = _two_tasks()
    like_task0 = torch.cat([labels[:24], labels[:24]])
    target = torch.full((ids.shape[0],), new)
    with torch.no_grad():
        before = float(F.cross_entropy(model(input_ids=ids, task_ids=target).logits, like_task0))
    after = _train(model, steps=60, lr=5e-2, task_ids=target, labels=like_task0)
    assert all(torch.equal(v, {**poly.A, **poly.B}[k]) for k, v in inventory.items())
    assert after < before - 0.05


def test_bad_calls_name_the_fix() -> None:
    model = _attached("bert", "poly")
    with pytest.raises(unipelt.ConfigError, match=r"poly routes 3 tasks: pass task_ids="):
        logits(model, inputs("bert"))
    with pytest.raises(unipelt.ConfigError, match="do not fit a batch of 3 rows and 3 poly tasks"):
        logits(model, {**inputs("bert"), "task_ids": torch.tensor([0, 3, 1])})
    with pytest.raises(unipelt.ConfigError, match="heads=3 must divide"):
        unipelt.attach(build("bert"), {"method": "poly_s", "heads": 3})
    with pytest.raises(unipelt.ConfigError, match="routing must be one of"):
        unipelt.attach(build("bert"), {"method": "poly", "routing": "hard"})


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("key", ["poly", "poly_s", "poly_mu", "poly_one_task", "poly_s_one_task"])
def test_each_task_computes_its_routed_lora_as_defined(family: str, key: str) -> None:
    """Task t's rows get W + (alpha / r) B_t A_t, with A_t and B_t the routed averages of the skills, head
    block by head block (Poly-S: A's input columns, B's output rows): built here from the definition."""
    import copy

    # one task, or Poly-mu's uniform routing: every row routes alike
    one_task = {"poly_one_task": {"method": "poly", "tasks": 1}, "poly_s_one_task": {"method": "poly_s", "tasks": 1}}
    if key in one_task:
        model = build(family)
        torch.manual_seed(0)
        unipelt.attach(model, one_task[key])
    else:
        model = _attached(family, key)
    reference_base = copy.deepcopy(build(family))
    _perturb(model)
    (poly,) = deltas(model).values()
    cfg = poly.config
    batch = inputs(family)
    for task in range(cfg.tasks):
        ids = torch.full((batch["input_ids"].shape[0],), task)
        reference = copy.deepcopy(reference_base).eval()
        with torch.no_grad():
            for site_key, proj in poly.sites.items():
                w = poly.weights(site_key, ids[:1])[0]  # (heads, skills)
                a, b = poly.A[site_key], poly.B[site_key]  # (k, r, d_in), (k, d_out, r)
                blocks_in, blocks_out = a.shape[2] // cfg.heads, b.shape[1] // cfg.heads
                a_t = torch.cat([torch.einsum("k,krd->rd", w[j], a[:, :, j * blocks_in:(j + 1) * blocks_in])
                                 for j in range(cfg.heads)], dim=1)
                b_t = torch.cat([torch.einsum("k,kor->or", w[j], b[:, j * blocks_out:(j + 1) * blocks_out])
                                 for j in range(cfg.heads)], dim=0)
                reference.get_submodule(proj.path).weight += cfg.alpha / cfg.r * b_t @ a_t
        torch.testing.assert_close(logits(model, {**batch, "task_ids": ids}), logits(reference, batch),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("key", ["poly", "poly_s", "poly_mu", "new_task"])
def test_one_task_calls_mix_first_and_equal_the_per_row_path(family: str, key: str) -> None:
    """A call without task_ids routes every row to one task (the only one, or add_task's): its sites mix
    A_t and B_t first and run as a rank-r LoRA. Outputs and every gradient equal the per-row path's, in
    training mode too (the same relaxed-Bernoulli draws under the same seed). T5's cross-attention reads two
    inputs, so its v site mixes its pair again at its own call: other draws in training mode, as valid."""
    model = build(family)
    torch.manual_seed(0)
    config = {"method": "poly", "tasks": 2} if key == "new_task" else {**CONFIGS[key], "tasks": 1}
    unipelt.attach(model, dict(config))
    _perturb(model)
    poly = deltas(model)["poly"]
    task = poly.add_task() if key == "new_task" else 0
    batch = inputs(family)
    rows = batch["input_ids"].shape[0]

    def run(with_ids: bool, seed: int):
        torch.manual_seed(seed)
        call = {**batch, "task_ids": torch.full((rows,), task)} if with_ids else batch
        out = model(**call)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        grads = torch.autograd.grad(loss, [p for p in poly.parameters() if p.requires_grad], allow_unused=True)
        return out.detach(), grads

    for mode in ("eval", "train") if family != "t5" else ("eval",):
        getattr(model, mode)()
        (out_mixed, g_mixed), (out_rows, g_rows) = run(False, 3), run(True, 3)
        torch.testing.assert_close(out_mixed, out_rows, atol=2e-5, rtol=1e-4)
        for a, b in zip(g_mixed, g_rows, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        assert any(g is not None and g.abs().sum() > 0 for g in g_mixed)

"""Multi-task serving: several task deltas on one base model, one batch whose rows belong to different tasks.

Each row's output must equal what its task's delta gives alone, for every method that can serve rows
(adapters, LoRA, prefixes, UniPELT's gated mix); the rest are refused with a clear error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import unipelt
from conftest import build, inputs, logits, perturb_

TASKS = {
    # first: its delta folds into W_q's and W_v's GEMMs (Installer.add_weight_delta), which must step aside
    # for the rows of other tasks
    "krona": {"method": "krona", "a_out": 4, "a_in": 4},
    "lora": {"method": "lora", "r": 4},
    "houlsby": {"method": "houlsby", "bottleneck": 8},
    "parallel": {"method": "parallel", "bottleneck": 8, "scaling": 4.0},
    "prefix": {"method": "prefix", "length": 3},
    "unipelt": {"method": "unipelt", "adapter": {"bottleneck": 8}, "prefix": {"length": 2}, "lora": {"r": 2}},
    "compacter": {"method": "compacter++", "bottleneck": 8},
    "ia3": {"method": "ia3"},
    "ln": {"method": "ln"},
    "kadaptation": {"method": "kadaptation", "n": 4},
}
BIAS_TASKS = {"bitfit": {"method": "bitfit"}, "lora": {"method": "lora", "r": 4}}


def _saved_task(family: str, config: dict, folder: Path, seed: int) -> Path:
    """A trained-looking delta (random values, head untouched) saved to ``folder``."""
    model = build(family)
    torch.manual_seed(seed)
    unipelt.attach(model, config, train_head=False)
    perturb_(model.unipelt_deltas.parameters(), seed, 0.2)
    return unipelt.save(model, folder)


def _alone(family: str, folder: Path, batch: dict) -> torch.Tensor:
    return logits(unipelt.load(build(family), folder), batch)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "bart"])
def test_each_row_gets_its_tasks_output(family: str, tmp_path: Path) -> None:
    tasks = TASKS if family not in ("bert", "gpt2") else {**TASKS, **BIAS_TASKS}  # llama and t5 have no biases
    names = list(tasks)
    folders = {name: _saved_task(family, tasks[name], tmp_path / name, seed=i) for i, name in enumerate(names)}
    batch = inputs(family)  # 3 rows, the last padded
    alone = {name: _alone(family, folder, batch) for name, folder in folders.items()}
    served = build(family)
    assert unipelt.load_tasks(served, folders) == names
    for task_ids in ([0, 1, 2], [3, 4, 5], [5, 3, 0], [2, 2, 2], [len(names) - 1, 6, 0]):
        out = logits(served, {**batch, "task_ids": torch.tensor(task_ids)})
        for row, task in enumerate(task_ids):
            torch.testing.assert_close(out[row], alone[names[task]][row], atol=1e-5, rtol=0,
                                       msg=f"row {row} of task {names[task]}")
    # the tasks really differ: the served output depends on the ids
    assert not torch.allclose(logits(served, {**batch, "task_ids": torch.tensor([0, 0, 0])}),
                              logits(served, {**batch, "task_ids": torch.tensor([1, 1, 1])}))


def test_serving_errors_name_the_fix(tmp_path: Path) -> None:
    lora = _saved_task("bert", TASKS["lora"], tmp_path / "lora", seed=0)
    prefix = _saved_task("bert", TASKS["prefix"], tmp_path / "prefix", seed=1)
    served = unipelt.load_tasks(build("bert"), {"a": lora, "b": prefix}) and build("bert")
    unipelt.load_tasks(served, {"a": lora, "b": prefix})
    batch = inputs("bert")
    with pytest.raises(unipelt.ConfigError, match=r"serves the tasks \['a', 'b'\]: pass task_ids="):
        logits(served, batch)
    with pytest.raises(unipelt.ConfigError, match=r"task_ids holds \[2\]"):
        logits(served, {**batch, "task_ids": torch.tensor([0, 2, 1])})
    with pytest.raises(unipelt.ConfigError, match="already served"):
        unipelt.load(served, lora, task="a")
    # a served delta never folds into the shared weights
    with pytest.warns(UserWarning, match="serves task 'a'"):
        unipelt.merge(served)
    assert set(served.unipelt_deltas) == {"a__lora", "b__prefix"}

    with_head = build("bert")
    unipelt.attach(with_head, "lora")
    unipelt.save(with_head, tmp_path / "head")
    model = build("bert")
    with pytest.raises(unipelt.DeltaFileError, match="carries a trained task head"):
        unipelt.load_tasks(model, {"x": tmp_path / "head"})
    rational = _saved_task("bert", {"method": "rational"}, tmp_path / "rational", seed=2)
    with pytest.raises(unipelt.ConfigError, match=r"\['rational'\] cannot serve one task among others"):
        unipelt.load_tasks(model, {"x": rational})
    assert "unipelt_deltas" not in model._modules  # nothing half-loaded stays
    # prompts share one insertion: every served task needs a prompt of one length and position, or none has
    prompt = _saved_task("bert", {"method": "prompt", "length": 2}, tmp_path / "prompt", seed=3)
    with pytest.raises(unipelt.ConfigError, match="prompts of one length and position, or none"):
        unipelt.load_tasks(build("bert"), {"a": lora, "b": prompt})
    # a prompt joined after the embeddings (UniPELT's default on BERT, saved as join="embeddings") is served alone
    seed_prompt = _saved_task("bert", {"method": "unipelt", "prompt": True}, tmp_path / "seed_prompt", seed=4)
    with pytest.raises(unipelt.ConfigError, match=r"join='embeddings'\) is served alone"):
        unipelt.load_tasks(build("bert"), {"a": seed_prompt})
    with pytest.raises(unipelt.ConfigError, match="serve this t5 delta alone"):
        unipelt.load_tasks(build("t5"), {"a": _saved_task("t5", {"method": "prompt", "length": 2},
                                                           tmp_path / "t5prompt", seed=4)})
    with pytest.raises(unipelt.ConfigError, match="serves no tasks"):
        logits(unipelt.load(build("bert"), lora), {**batch, "task_ids": torch.tensor([0, 0, 0])})


PROMPT_TASKS = {
    "prompt": {"method": "prompt", "length": 3},
    "prompt_lora": unipelt.Composition(methods=[{"method": "prompt", "length": 3}, {"method": "lora", "r": 2}]),
    "unipelt_prompt": {"method": "unipelt", "adapter": {"bottleneck": 8}, "prefix": {"length": 2},
                       "lora": {"r": 2}, "prompt": {"length": 3, "join": "input"}},  # served prompts share the ids
}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "distilbert"])
def test_prompt_tasks_share_one_insertion(family: str, tmp_path: Path) -> None:
    """Tasks whose deltas hold prompts of one length: each row gets its own task's prompt (and the rest of its
    delta), as alone."""
    import copy

    names = list(PROMPT_TASKS)
    folders = {n: _saved_task(family, copy.deepcopy(PROMPT_TASKS[n]), tmp_path / n, seed=i)
               for i, n in enumerate(names)}
    batch = inputs(family)
    alone = {n: _alone(family, folder, batch) for n, folder in folders.items()}
    served = build(family)
    unipelt.load_tasks(served, folders)
    for task_ids in ([0, 1, 2], [2, 0, 1], [1, 1, 1]):
        out = logits(served, {**batch, "task_ids": torch.tensor(task_ids)})
        assert out.shape == alone[names[0]].shape
        for row, task in enumerate(task_ids):
            torch.testing.assert_close(out[row], alone[names[task]][row], atol=1e-5, rtol=0,
                                       msg=f"row {row} of task {names[task]}")


def test_a_failed_task_leaves_the_served_ones(tmp_path: Path) -> None:
    lora = _saved_task("bert", TASKS["lora"], tmp_path / "lora", seed=0)
    prompt = _saved_task("bert", {"method": "rational"}, tmp_path / "prompt", seed=2)
    served = build("bert")
    unipelt.load_tasks(served, {"a": lora})
    with pytest.raises(unipelt.ConfigError):
        unipelt.load(served, prompt, task="b")
    batch = inputs("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = logits(served, {**batch, "task_ids": torch.tensor([0, 0, 0])})
    torch.testing.assert_close(out, _alone("bert", lora, batch), atol=1e-5, rtol=0)

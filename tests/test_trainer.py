"""The Hugging Face ``Trainer`` on an attached tiny BERT: delta-only checkpoints, best-model restore, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import unipelt
from conftest import VOCAB, build, inputs, logits, perturb_
from unipelt.serialization import DeltaFileError, delta_tensors
from unipelt.trainer import TRAINING_FILE, training_state

LORA = {"method": "lora", "r": 2}
# LoRA, and UniPELT: a gated mix whose prefix trains through an MLP that the saved delta replaces by its output
CONFIGS = {"lora": LORA, "unipelt": "unipelt"}
STEPS, EVERY = 8, 2
# the eval "score" per step: the best checkpoint is an early one (4), not the last, whatever the losses are
SCORES = {2: 0.2, 4: 0.9, 6: 0.5, 8: 0.1}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
DELTA_FILES = {"delta.safetensors", "unipelt.json"}


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def _trainer(model, out: Path, cls=unipelt.DeltaTrainer, **overrides) -> transformers.Trainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=STEPS,
                    learning_rate=1e-2, save_steps=EVERY, eval_strategy="steps", eval_steps=EVERY,
                    load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True, seed=0,
                    report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100)
    settings.update(overrides)
    trainer = None

    def score(_prediction) -> dict[str, float]:
        return {"score": SCORES[trainer.state.global_step]}

    trainer = cls(model=model, args=transformers.TrainingArguments(**settings), train_dataset=_data(32),
                  eval_dataset=_data(8), compute_metrics=score)
    return trainer


class KeepFinal(transformers.TrainerCallback):
    """The training state after the last step (before ``load_best_model_at_end`` restores the best one)."""

    def __init__(self, model):
        self.model, self.state = model, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self.state = training_state(self.model)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _file(folder: Path, name: str = TRAINING_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _same_logits(a, b) -> bool:
    a.eval(), b.eval()
    return torch.equal(logits(a, inputs("bert")), logits(b, inputs("bert")))


def _fresh(config, seed: int = 7):
    """The same base model with another initial delta and head: a restore must set them all."""
    base = build("bert")
    perturb_(base.classifier.parameters(), seed=seed, scale=0.5)
    torch.manual_seed(seed)
    return unipelt.attach(base, config)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, tmp_path_factory):
    """One uninterrupted run: its config, output folder, the model after training (best restored), the trainer,
    and the training state after the last step."""
    config = CONFIGS[request.param]
    out = tmp_path_factory.mktemp(f"trainer-{request.param}")
    model = unipelt.attach(build("bert"), config)
    trainer = _trainer(model, out)
    final = KeepFinal(model)
    trainer.add_callback(final)
    trainer.train()
    return config, out, model, trainer, final.state


def test_checkpoints_hold_the_delta_only(run):
    _, out, model, trainer, _ = run
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{s}" for s in range(EVERY, STEPS + 1, EVERY)]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for folder in checkpoints:
        assert {p.name for p in folder.iterdir()} == DELTA_FILES | {TRAINING_FILE} | TRAINER_FILES, folder
        # the training state holds the delta and the trained head, no base weight
        names = set(_file(folder))
        assert {n for n in names if not n.startswith("unipelt_deltas.")} == {n for n in trained
                                                                             if n.startswith("classifier.")}
    # no config or weights: from_pretrained on a checkpoint fails loudly instead of dropping the delta
    with pytest.raises(OSError):
        transformers.BertForSequenceClassification.from_pretrained(checkpoints[0])
    # save_model writes the (best) delta, which a fresh base loads to the same logits
    trainer.save_model()
    assert {p.name for p in out.iterdir() if p.is_file()} == DELTA_FILES | {"training_args.bin"}
    assert _same_logits(unipelt.load(build("bert"), out), model)


def test_best_model_is_restored_exactly(run):
    _, out, model, trainer, final = run
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    assert _equal(training_state(model), _file(out / "checkpoint-4"))
    assert _equal(delta_tensors(model), _file(out / "checkpoint-4", "delta.safetensors"))
    assert _equal(final, _file(out / f"checkpoint-{STEPS}"))
    assert not _equal(final, _file(out / "checkpoint-4"))  # the restore did something
    assert _same_logits(unipelt.load(build("bert"), out / "checkpoint-4"), model)


def test_resume_equals_uninterrupted(run, tmp_path):
    config, out, model, _, final = run
    # a run killed after step 4: only its checkpoint-4 is left
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    resumed = _fresh(config)
    trainer = _trainer(resumed, tmp_path)
    kept = KeepFinal(resumed)
    trainer.add_callback(kept)
    trainer.train(resume_from_checkpoint=True)
    assert _equal(kept.state, final)  # the last step's delta and head, bit for bit
    for step in range(6, STEPS + 1, EVERY):
        assert _equal(_file(tmp_path / f"checkpoint-{step}"), _file(out / f"checkpoint-{step}"))
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    assert _equal(training_state(resumed), training_state(model))
    assert _same_logits(resumed, model)


def test_resume_from_the_delta_pair_alone(run, tmp_path):
    """Without the training state, the saved delta restores what it can hold: LoRA exactly; a prefix trained
    through its MLP cannot go back into the MLP, and says so."""
    config, out, _, _, final = run
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / TRAINING_FILE).unlink()
    resumed = _fresh(config)
    trainer = _trainer(resumed, tmp_path)
    if config != LORA:
        with pytest.raises(DeltaFileError, match="without reparametrisation"):
            trainer.train(resume_from_checkpoint=True)
        return
    kept = KeepFinal(resumed)
    trainer.add_callback(kept)
    trainer.train(resume_from_checkpoint=True)
    assert _equal(kept.state, final)


def test_resume_refuses_another_config(run, tmp_path):
    out = run[1]
    other = unipelt.attach(build("bert"), {"method": "lora", "r": 4})
    with pytest.raises(DeltaFileError, match="attach the same config"):
        _trainer(other, tmp_path).train(resume_from_checkpoint=str(out / "checkpoint-4"))


def test_delta_trainer_needs_an_attached_model(tmp_path):
    with pytest.raises(unipelt.ConfigError, match="unipelt.attach"):
        _trainer(build("bert"), tmp_path)


def test_stock_trainer_saves_keep_the_delta(tmp_path):
    """The stock Trainer saves the whole model (and reloads it right); the delta pair comes beside it, with a
    warning that from_pretrained would drop it."""
    model = unipelt.attach(build("bert"), LORA)
    trainer = _trainer(model, tmp_path, cls=transformers.Trainer)
    with pytest.warns(UserWarning, match="from_pretrained on that folder loads the base model WITHOUT the delta"):
        trainer.train()
    for step in range(EVERY, STEPS + 1, EVERY):
        assert {p.name for p in (tmp_path / f"checkpoint-{step}").iterdir()} >= {"model.safetensors"} | DELTA_FILES
    assert _equal(delta_tensors(model), _file(tmp_path / "checkpoint-4", "delta.safetensors"))
    assert _same_logits(unipelt.load(build("bert"), tmp_path / "checkpoint-4"), model)
    unipelt.detach(model)
    assert "save_pretrained" not in model.__dict__  # a bare model saves as transformers does

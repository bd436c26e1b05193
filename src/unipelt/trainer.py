"""Train an attached model with the Hugging Face ``Trainer``: checkpoints that hold the delta only.

>>> model = unipelt.attach(AutoModelForSequenceClassification.from_pretrained(base), "lora")
>>> trainer = unipelt.DeltaTrainer(model=model, args=TrainingArguments(..., load_best_model_at_end=True), ...)
>>> trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
>>> unipelt.load(AutoModelForSequenceClassification.from_pretrained(base), "out/checkpoint-500")

:class:`DeltaTrainer` is the stock ``Trainer`` with the model's weights saved and restored the unipelt way:

- ``save_model`` writes ``delta.safetensors`` + ``unipelt.json`` (:func:`unipelt.save`: the delta and the trained
  task head, what :func:`unipelt.load` reads); each checkpoint also holds ``unipelt_training.safetensors``, the
  training state of the delta (:func:`training_state`: every trainable tensor as it is trained, for instance a
  prefix's reparametrisation MLP, which the saved delta replaces by its output), beside the optimizer, scheduler,
  RNG and trainer-state files the ``Trainer`` writes itself. No base weights and no ``config.json``: ``from_pretrained``
  on a checkpoint fails loudly instead of loading the base model without its delta;
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the checkpoint's training state into the attached
  delta in place (:func:`load_training_state`): the same parameter objects, bit for bit the saved values. A folder
  with the delta pair alone (a ``save_model`` folder) is restored from that (:func:`restore`).

A model with a delta attached and trained by the stock ``Trainer`` (or saved with ``save_pretrained``) still
saves the whole model, which the ``Trainer`` itself reloads correctly; ``save_pretrained`` then also writes the
delta pair beside it and warns that ``from_pretrained`` drops the delta (:func:`save_pretrained_with_delta`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.trainer import TRAINING_ARGS_NAME

from .config import ConfigError
from .core import STORE, attachment, deltas
from .serialization import (
    DELTA_FILE,
    META_FILE,
    DeltaFileError,
    _atomic_write,
    _sha256,
    config_hash,
    read_meta,
    save,
)

__all__ = ["DeltaTrainer", "is_delta_folder", "load_training_state", "restore", "save_pretrained_with_delta",
           "save_training_state", "training_state"]

TRAINING_FILE = "unipelt_training.safetensors"
TRAINING_FORMAT = "unipelt-training/1"


def is_delta_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a delta written by :func:`unipelt.save` (or a save of one that was interrupted)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (META_FILE, DELTA_FILE, META_FILE + ".new"))


def _plain(config: Any) -> Any:
    return json.loads(json.dumps(config, default=str))


def _attached(model: nn.Module, what: str) -> Any:
    state = attachment(model)
    if state is None or not deltas(model):
        raise ConfigError(f"{what} needs a model with a delta attached (unipelt.attach); use unipelt.load to attach "
                          f"a saved delta to a bare model")
    return state


def _training_names(model: nn.Module) -> set[str]:
    return ({n for n, p in model.named_parameters() if p.requires_grad}
            | {f"{STORE}.{k}" for k in deltas(model).state_dict()})


def _signature(model: nn.Module, state: Any) -> str:
    """The run a training state belongs to: the methods' names and configs as trained, and ``train_head``."""
    methods = [[name, _plain(m.config.to_dict())] for name, m in deltas(model).items()]
    return json.dumps({"methods": methods, "train_head": state.train_head}, sort_keys=True)


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The delta's training state by the model's own names: every trainable parameter (the methods' and the task
    head's) and the whole state of the methods (buffers, and deltas switched off by ``set_active``), as trained.
    Unlike :func:`unipelt.serialization.delta_tensors`, nothing is converted for serving."""
    _attached(model, "training_state")
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"{STORE}.{k}": v for k, v in deltas(model).state_dict().items()})
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_training_state(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write :func:`training_state` to ``folder/unipelt_training.safetensors`` (atomically), tagged with the run's
    methods and base model, for :func:`load_training_state`."""
    state = _attached(model, "save_training_state")
    path = Path(folder) / TRAINING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = training_state(model)
    meta = {"format": TRAINING_FORMAT, "config_hash": config_hash(model), "class": type(model).__name__,
            "run": _signature(model, state)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_training_state(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Copy the training state in ``folder`` (:func:`save_training_state`) into ``model``, in place and exactly.

    The model must carry the run's methods under the same names with the same configs, on the same base model.
    Parameters keep their identity, so an optimizer built on them stays valid.
    """
    state = _attached(model, "load_training_state")
    path = Path(folder) / TRAINING_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # missing, or safetensors' own error types
        raise DeltaFileError(f"{path} cannot be read ({e})") from e
    if meta.get("format") != TRAINING_FORMAT:
        raise DeltaFileError(f"{path} has format {meta.get('format')!r}, expected {TRAINING_FORMAT!r}")
    if meta.get("config_hash") != config_hash(model) or meta.get("class") != type(model).__name__:
        raise DeltaFileError(f"{path} was saved for {meta.get('class')} (config {meta.get('config_hash')}), but "
                             f"this model is {type(model).__name__} (config {config_hash(model)})")
    if meta.get("run") != _signature(model, state):
        raise DeltaFileError(f"{path} belongs to the run {meta.get('run')}, but the model carries "
                             f"{_signature(model, state)}; a checkpoint restores the run that wrote it: attach the "
                             f"same config")
    expected = _training_names(model)
    if set(tensors) != expected:
        raise DeltaFileError(f"{path} does not fit this model: missing {sorted(expected - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:5]}")
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in tensors.items():
            if targets[name].shape != value.shape:
                raise DeltaFileError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is "
                                     f"{tuple(targets[name].shape)}")
            targets[name].copy_(value)
    return model


def restore(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Copy the delta saved in ``folder`` into the delta attached to ``model``, in place.

    Unlike :func:`unipelt.load` (which attaches a saved delta to a bare model), the model must already carry
    the same methods under the same names, with the same configs: a checkpoint restores the run that wrote
    it. Parameters keep their identity (an optimizer built on them stays valid) and get the saved values
    exactly; the trained task head too, when the delta trains one.
    """
    state = _attached(model, "restore")
    folder = Path(folder)
    meta = read_meta(folder)
    base = meta["base_model"]
    if base["config_hash"] != config_hash(model) or base["class"] != type(model).__name__:
        raise DeltaFileError(f"{folder} was saved for {base['class']} ({base['model_type']}, config "
                             f"{base['config_hash']}), but this model is {type(model).__name__} "
                             f"({model.config.model_type}, config {config_hash(model)})")
    saved = {entry["name"]: entry["config"] for entry in meta["methods"]}
    attached = {name: _plain((m.saved_config() if hasattr(m, "saved_config") else m.config).to_dict())
                for name, m in deltas(model).items()}
    if list(saved) != list(attached) or any(_plain(saved[n]) != attached[n] for n in saved):
        raise DeltaFileError(f"{folder} holds the deltas {saved}, but the model carries {attached}; a checkpoint "
                             f"restores the run that wrote it: attach the same config")
    if bool(meta.get("train_head", True)) != state.train_head:
        raise DeltaFileError(f"{folder} was saved with train_head={meta.get('train_head', True)}, but the model "
                             f"was attached with train_head={state.train_head}")
    delta_path = folder / DELTA_FILE
    if not delta_path.exists() or _sha256(delta_path) != meta.get("delta_sha256"):
        raise DeltaFileError(f"{delta_path} is missing or does not match {META_FILE} (corrupt, or a save was "
                             f"interrupted)")
    tensors = load_file(str(delta_path))
    with torch.no_grad():
        for name, method in deltas(model).items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            try:
                method.load_delta_state(own)
            except (ConfigError, RuntimeError) as e:
                raise DeltaFileError(f"{delta_path}: the tensors of '{name}' do not fit it ({e})") from e
        for head_name in meta.get("heads", []):
            head = state.model_map.head_modules.get(head_name)
            if head is None:
                raise DeltaFileError(f"{folder} has a trained head '{head_name}' this model lacks")
            own = {k[len(head_name) + 6:]: v for k, v in tensors.items() if k.startswith(f"head.{head_name}.")}
            try:
                head.load_state_dict(own)
            except RuntimeError as e:
                raise DeltaFileError(f"{folder}: the saved head '{head_name}' does not fit ({e})") from e
    return model


class DeltaTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a model with a unipelt delta attached: checkpoints hold the delta only.

    Takes the ``Trainer``'s arguments unchanged. ``save_model`` writes ``delta.safetensors`` + ``unipelt.json``;
    each checkpoint also holds the delta's training state (``unipelt_training.safetensors``) beside the
    ``Trainer``'s optimizer, scheduler, RNG and state files, and no base weights. ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` restore the delta exactly. Load a saved delta elsewhere with
    ``unipelt.load(base_model, folder)``. Runs on one device or under DDP; DeepSpeed and FSDP are refused.
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any):
        self._in_checkpoint = False
        super().__init__(model, *args, **kwargs)
        self._attached_model()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError("DeltaTrainer saves and restores the delta on one device or under DDP; DeepSpeed and "
                              "FSDP shard the parameters it reads: train without them")

    def _attached_model(self, model: nn.Module | None = None) -> nn.Module:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        if attachment(model) is None or not deltas(model):
            raise ConfigError("DeltaTrainer trains a model with a unipelt delta attached: call "
                              "unipelt.attach(model, config) first (or use transformers.Trainer for a full model)")
        return model

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._in_checkpoint = True  # _save writes the training state too
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The delta and trained head (no base weights; in a checkpoint, their training state too), the tokenizer
        or processor, and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self._attached_model()
        save(model, output_dir)
        if self._in_checkpoint:
            save_training_state(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _restore_from(self, folder: str, model: nn.Module | None = None) -> bool:
        """Restore the delta from ``folder`` if it is one of ours; False for a full checkpoint (the stock way)."""
        if (Path(folder) / TRAINING_FILE).exists():
            load_training_state(self._attached_model(model), folder)
        elif is_delta_folder(folder):
            restore(self._attached_model(model), folder)
        else:
            return False
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._restore_from(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._restore_from(self.state.best_model_checkpoint):
            super()._load_best_model()


_SAVE_PRETRAINED_WARNING = (
    "save_pretrained of a model with a unipelt delta attached writes the whole model, and "
    "from_pretrained on that folder loads the base model WITHOUT the delta. The delta and trained head are "
    "also written there as delta.safetensors + unipelt.json: load them with unipelt.load(base_model, folder). "
    "For Trainer checkpoints that hold the delta only, train with unipelt.DeltaTrainer."
)


def save_pretrained_with_delta(model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``model.save_pretrained`` of a model with a delta attached (``attach`` puts it on the model).

    Writes what ``transformers`` writes (the whole model, whose ``unipelt_deltas.*`` tensors ``from_pretrained``
    drops), then the delta pair beside it (``unipelt.save``), and warns. The stock ``Trainer`` saves through
    here, so its checkpoints carry a delta ``unipelt.load`` reads, and reload themselves correctly on
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` (the whole state dict, delta included).
    """
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True) and deltas(model):
        save(model, save_directory)
        warnings.warn(_SAVE_PRETRAINED_WARNING, UserWarning, stacklevel=3)  # the caller of model.save_pretrained
    return result

"""What every task gives the trainer: examples, features, a model class, and scores.

A task loads its splits from local files (``data_dir``) or the Hugging Face Hub, turns examples
into model features with a tokenizer, and scores a model on features. The trainer knows nothing
else about it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class TaskDataError(ValueError):
    """Data that cannot be used: missing files, a column layout that does not match, unknown labels."""


def read_lines(path: Path) -> list[str]:
    """A text file's lines; bad UTF-8, a folder where the file should be or an unreadable file is a
    :class:`TaskDataError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(f)
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from e
    except OSError as e:  # a folder where the file should be, an unreadable file
        raise TaskDataError(f"{path} cannot be read ({e})") from e


@dataclass
class Features:
    """Tokenised rows (each a dict of 1-D tensors) plus what scoring needs to map them back."""

    rows: list[dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


class Task:
    """Base class of tasks. Subclasses set the class attributes and implement the four methods."""

    name: str = ""
    kind: str = ""  # "classification", "regression", "qa", "token"
    main_metric: str = ""
    greater_is_better: bool = True
    splits: tuple[str, ...] = ("train", "dev", "test")
    report_split: str = "dev"  # the split a run reports on unless told otherwise
    max_length: int = 128  # default tokens per sequence

    def default_report_split(self, data_dir: str | None) -> str:
        """The split to report on with this ``data_dir``; a task whose data decides (SQuAD's re-split) overrides it."""
        return self.report_split

    def texts(self, examples: Sequence[Any]) -> list[str]:
        """The raw text of ``examples``, for task-adaptive pretraining (MLM on the task's own training text)."""
        raise NotImplementedError(f"task {self.name or type(self).__name__} has no text for task-adaptive pretraining")

    def load(self, split: str, data_dir: str | None) -> list[Any]:
        """The examples of ``split`` (``train``, ``dev`` or ``test``)."""
        raise NotImplementedError

    def model_kwargs(self, train_examples: Sequence[Any]) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` (``num_labels``, label names)."""
        return {}

    def auto_model_class(self):
        raise NotImplementedError

    def featurize(self, examples: Sequence[Any], tokenizer: Any, max_length: int) -> Features:
        raise NotImplementedError

    def score(self, model: torch.nn.Module, features: Features, examples: Sequence[Any],
              predict: Any) -> dict[str, float]:
        """Metrics of ``model`` on ``features``.

        ``predict(rows)`` runs the model over the rows in batches and returns a dict of tensors
        concatenated over batches, keyed like the model's output: ``"logits"`` (classification,
        regression, token tasks) or ``"start_logits"``/``"end_logits"`` (QA). Sequence-shaped
        outputs are padded with zeros to the longest row; rows keep their order.
        """
        raise NotImplementedError


def k_shot(examples: Sequence[Any], k: int, seed: int) -> tuple[list[Any], list[Any]]:
    """UniPELT's low-resource protocol: K training and K validation examples drawn from ``train``.

    The two samples are disjoint, drawn with ``random.Random(seed)``, so a seed gives the same
    samples on every machine.
    """
    if k < 1:
        raise TaskDataError(f"--k-shot must be at least 1, got {k}")
    if len(examples) < 2 * k:
        raise TaskDataError(f"--k-shot {k} needs {2 * k} training examples (K to train, K to validate), "
                            f"the task has {len(examples)}; use a smaller --k-shot")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:k]], [examples[i] for i in order[k:2 * k]]


def hold_out(examples: Sequence[Any], seed: int, size: int = 1000) -> tuple[list[Any], list[Any]]:
    """Full-data protocol: a validation sample (10% of train, at most ``size``) held out for early stopping."""
    n_val = max(1, min(size, len(examples) // 10))
    if len(examples) < 2:
        raise TaskDataError(f"the training set has {len(examples)} example(s); need at least 2")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]

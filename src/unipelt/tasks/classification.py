"""Sentence(-pair) classification and regression: every GLUE task, and text classification from JSONL.

Local GLUE files are read in GLUE's own TSV layouts, with or without a header row (see
``GLUE_LAYOUTS``); with no ``data_dir`` the task loads from the Hugging Face Hub (``nyu-mll/glue``).
JSONL files hold one ``{"text": ..., "label": ...}`` per line (the DAPT domain datasets' form).
``data_dir`` may be a task's own folder or a data root above it (``glue/<Folder>``, ``domains/<name>``).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .base import Features, Task, TaskDataError, read_lines


@dataclass
class TextExample:
    text_a: str
    text_b: str | None
    label: int | float | None  # class index, score, or None (unlabelled test data)


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task's fields are: by header name, or by position in header-less files."""

    folder: str
    names: tuple[str, str | None, str]  # header names of text_a, text_b, label
    positions: tuple[int, int | None, int]  # the same fields by column index, for files without header
    hub: tuple[str, str | None, str]  # field names in the Hub dataset
    hub_config: str
    labels: tuple[str, ...] | None  # None: regression
    metric_names: tuple[str, ...]
    files: dict[str, str] | None = None  # split -> file name, where not "<split>.tsv"


GLUE_LAYOUTS: dict[str, GlueLayout] = {
    "cola": GlueLayout("CoLA", ("sentence", None, "label"), (3, None, 1), ("sentence", None, "label"), "cola",
                       ("0", "1"), ("matthews", "accuracy")),
    "sst2": GlueLayout("SST-2", ("sentence", None, "label"), (0, None, 1), ("sentence", None, "label"), "sst2",
                       ("0", "1"), ("accuracy",)),
    "mrpc": GlueLayout("MRPC", ("#1 String", "#2 String", "Quality"), (3, 4, 0), ("sentence1", "sentence2", "label"),
                       "mrpc", ("0", "1"), ("f1", "accuracy")),
    "stsb": GlueLayout("STS-B", ("sentence1", "sentence2", "score"), (7, 8, 9), ("sentence1", "sentence2", "label"),
                       "stsb", None, ("pearson", "spearman")),
    "qqp": GlueLayout("QQP", ("question1", "question2", "is_duplicate"), (3, 4, 5),
                      ("question1", "question2", "label"), "qqp", ("0", "1"), ("f1", "accuracy")),
    "mnli": GlueLayout("MNLI", ("sentence1", "sentence2", "gold_label"), (8, 9, -1), ("premise", "hypothesis", "label"),
                       "mnli", ("entailment", "neutral", "contradiction"), ("accuracy",),
                       {"dev": "dev_matched.tsv", "test": "test_matched.tsv"}),
    "mnli_mm": GlueLayout("MNLI", ("sentence1", "sentence2", "gold_label"), (8, 9, -1),
                          ("premise", "hypothesis", "label"), "mnli", ("entailment", "neutral", "contradiction"),
                          ("accuracy",), {"dev": "dev_mismatched.tsv", "test": "test_mismatched.tsv"}),
    "qnli": GlueLayout("QNLI", ("question", "sentence", "label"), (1, 2, 3), ("question", "sentence", "label"), "qnli",
                       ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueLayout("RTE", ("sentence1", "sentence2", "label"), (1, 2, 3), ("sentence1", "sentence2", "label"), "rte",
                      ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueLayout("WNLI", ("sentence1", "sentence2", "label"), (1, 2, 3), ("sentence1", "sentence2", "label"),
                       "wnli", ("0", "1"), ("accuracy",)),
}

_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}

# The DAPT/TAPT domain classification datasets, read from JSONL files (--data-dir).
DOMAIN_TASKS = ("chemprot", "rct", "citation_intent", "sciie", "ag_news", "hyperpartisan", "helpfulness", "imdb")
# Domain tasks whose main metric is micro-F1 (Gururangan et al. 2020, Table 5 note); the others use macro-F1.
MICRO_F1_TASKS = ("chemprot", "rct")

METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": metrics.accuracy, "f1": metrics.f1_binary, "matthews": metrics.matthews,
    "pearson": metrics.pearson, "spearman": metrics.spearman, "f1_macro": metrics.f1_macro,
    "f1_micro": metrics.f1_micro,
}


def read_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        raise TaskDataError(f"missing data file {path}; point --data-dir at the folder holding the task's files")
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8") from e
    except (OSError, csv.Error) as e:  # a folder where the file should be, an unreadable file
        raise TaskDataError(f"{path} cannot be read as a TSV file ({e})") from e


class SequenceTask(Task):
    """Classification (``labels`` given) or regression (``labels`` None) of one text or a pair."""

    def __init__(self, name: str, labels: tuple[str, ...] | None, metric_names: tuple[str, ...]):
        self.name = name
        self.labels = labels
        self.kind = "classification" if labels is not None else "regression"
        self.metric_names = metric_names
        self.main_metric = metric_names[0]

    def label_index(self, raw: Any, where: str) -> int | float | None:
        if self.labels is None:
            try:
                score = float(raw)
            except (TypeError, ValueError) as e:
                raise TaskDataError(f"{where}: score {raw!r} is not a number") from e
            if not math.isfinite(score):
                raise TaskDataError(f"{where}: score {raw!r} is not a finite number")
            return score
        raw = str(raw).strip()
        if raw not in self.labels:
            raise TaskDataError(f"{where}: label {raw!r} is not one of task {self.name}'s labels {list(self.labels)}; "
                                f"check that the file has this task's column layout")
        return self.labels.index(raw)

    def texts(self, examples: Sequence[TextExample]) -> list[str]:
        """Each example's ``text_a``, then its ``text_b`` as a line of its own; empty texts are left out."""
        return [t for ex in examples for t in (ex.text_a, ex.text_b) if t]

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, train_examples: Sequence[Any]) -> dict[str, Any]:
        if self.labels is None:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)},
                "problem_type": "single_label_classification"}

    def featurize(self, examples: Sequence[TextExample], tokenizer: Any, max_length: int) -> Features:
        rows = []
        for ex in examples:
            enc = tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=max_length)
            row = {k: torch.tensor(v) for k, v in enc.items()}
            if ex.label is not None:
                dtype = torch.float32 if self.labels is None else torch.long
                row["labels"] = torch.tensor(ex.label, dtype=dtype)
            rows.append(row)
        return Features(rows)

    def score(self, model, features: Features, examples: Sequence[TextExample], predict) -> dict[str, float]:
        logits = predict(features.rows)["logits"]
        pred = logits.squeeze(-1).tolist() if self.labels is None else logits.argmax(-1).tolist()
        gold = [ex.label for ex in examples]
        if any(g is None for g in gold):
            raise TaskDataError(f"{self.name}: this split has no labels to score against")
        return {name: float(METRICS[name](pred, gold)) for name in self.metric_names}


class GlueTask(SequenceTask):
    def __init__(self, name: str):
        self.layout = GLUE_LAYOUTS[name]
        super().__init__(name, self.layout.labels, self.layout.metric_names)

    def load(self, split: str, data_dir: str | None) -> list[TextExample]:
        if split not in self.splits:
            raise TaskDataError(f"unknown split {split!r}; use one of {self.splits}")
        if data_dir is None:
            return self._load_hub(split)
        lay = self.layout
        folder = Path(data_dir)
        for sub in (folder / lay.folder, folder / "glue" / lay.folder):  # a data root above the task folder
            if sub.is_dir():
                folder = sub
                break
        path = folder / (lay.files or {}).get(split, f"{split}.tsv")
        rows = read_tsv(path)
        if not rows:
            raise TaskDataError(f"{path} is empty")
        header = rows[0]
        has_header = lay.names[2] in header or lay.names[0] in header
        if has_header:
            idx = tuple(header.index(n) if n is not None and n in header else None for n in lay.names)
            missing = [n for n, i, needed in zip(lay.names, idx, (True, True, split != "test"), strict=True)
                       if n is not None and i is None and needed]
            if missing:
                raise TaskDataError(f"{path}: header {header} lacks column(s) {missing} of task {self.name}")
            rows = rows[1:]
        else:
            idx = lay.positions
        out = []
        for line, row in enumerate(rows, start=2 if has_header else 1):
            try:
                a = row[idx[0]]
                b = row[idx[1]] if idx[1] is not None else None
                raw = row[idx[2]] if idx[2] is not None else None
            except IndexError:
                raise TaskDataError(f"{path}:{line}: {len(row)} columns do not match task {self.name}'s layout "
                                    f"(text in column {idx[0]}, label in column {idx[2]})") from None
            label = self.label_index(raw, f"{path}:{line}") if raw not in (None, "") else None
            out.append(TextExample(a, b, label))
        unlabelled = [i for i, ex in enumerate(out) if ex.label is None]
        # the trainer batches rows alike: a label on every row, or (a test split) on none
        if unlabelled and (split != "test" or len(unlabelled) < len(out)):
            raise TaskDataError(f"{path}:{unlabelled[0] + (2 if has_header else 1)}: no label; label every row of "
                                f"the {split} split" + ("" if split != "test" else ", or none"))
        return out

    def _load_hub(self, split: str) -> list[TextExample]:
        from .hub import load_hub_split

        lay = self.layout
        hub_split = _HUB_SPLITS[split]
        if self.name == "mnli":
            hub_split = {"dev": "validation_matched", "test": "test_matched"}.get(split, hub_split)
        if self.name == "mnli_mm":
            hub_split = {"dev": "validation_mismatched", "test": "test_mismatched"}.get(split, hub_split)
        data = load_hub_split("nyu-mll/glue", lay.hub_config, hub_split)
        a, b, lab = lay.hub
        out = []
        for item in data:
            label = item[lab]
            label = None if label == -1 else (float(label) if self.labels is None else int(label))
            out.append(TextExample(item[a], item[b] if b else None, label))
        return out


class JsonlTask(SequenceTask):
    """Text classification from ``train.jsonl``/``dev.jsonl``/``test.jsonl`` with ``text`` and ``label``.

    Labels are the sorted distinct labels of the training file; a dev/test label outside them is an
    error. Scores: macro-F1 (main), accuracy and micro-F1; ChemProt and RCT put micro-F1 first, as the
    DAPT paper reports them. The domain tasks report on ``test`` (the paper's figures); ``text`` on ``dev``.
    """

    def __init__(self, name: str = "text"):
        metric_names = ("f1_micro", "f1_macro", "accuracy") if name in MICRO_F1_TASKS else \
            ("f1_macro", "accuracy", "f1_micro")
        super().__init__(name, (), metric_names)
        self.labels = None
        self.kind = "classification"
        if name in DOMAIN_TASKS:
            self.report_split = "test"

    def data_folder(self, data_dir: str) -> Path:
        """The folder holding ``train.jsonl``: ``data_dir`` itself, ``data_dir/<name>`` or ``data_dir/domains/<name>``.

        So ``--data-dir`` may name the task's folder or the shared data root.
        """
        root = Path(data_dir)
        tried = [root, root / self.name, root / "domains" / self.name]
        for folder in tried:
            if (folder / "train.jsonl").is_file():
                return folder
        raise TaskDataError(f"missing data file {' or '.join(str(f / 'train.jsonl') for f in tried)}; --data-dir "
                            f"must hold train.jsonl, dev.jsonl (test.jsonl), or be a folder above {self.name}/ "
                            f"or domains/{self.name}/")

    def _read(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            raise TaskDataError(f"missing data file {path}; --data-dir must hold train.jsonl, dev.jsonl (test.jsonl)")
        out = []
        for line_no, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep to parse
                raise TaskDataError(f"{path}:{line_no}: not JSON ({str(e).splitlines()[0]})") from e
            if not isinstance(item, dict) or "text" not in item or "label" not in item:
                raise TaskDataError(f"{path}:{line_no}: each line needs 'text' and 'label' fields")
            if not isinstance(item["text"], str):
                raise TaskDataError(f"{path}:{line_no}: 'text' must be a string, got {item['text']!r}")
            label = item["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int, float)) \
                    or (isinstance(label, float) and not math.isfinite(label)):
                raise TaskDataError(f"{path}:{line_no}: 'label' must be a string or a number, got {label!r}")
            out.append(item)
        return out

    def load(self, split: str, data_dir: str | None) -> list[TextExample]:
        if data_dir is None:
            raise TaskDataError(f"task {self.name} reads JSONL files: pass --data-dir DIR with train.jsonl and "
                                "dev.jsonl")
        folder = self.data_folder(data_dir)
        if self.labels is None:
            train = self._read(folder / "train.jsonl")
            if not train:
                raise TaskDataError(f"{folder / 'train.jsonl'} holds no examples; the task's labels are the training "
                                    f"file's, so it needs at least one line of text and label")
            self.labels = tuple(sorted({str(item["label"]) for item in train}))
        items = self._read(folder / f"{split}.jsonl")
        return [TextExample(str(it["text"]), None, self.label_index(it["label"], f"{folder / split}.jsonl"))
                for it in items]

    def model_kwargs(self, train_examples: Sequence[Any]) -> dict[str, Any]:
        assert self.labels is not None, "load the train split first"
        return super().model_kwargs(train_examples)

"""Named-entity recognition on CoNLL-style data: word-level tags, first-sub-token labels, entity F1.

Local files are CoNLL columns in ``data_dir``: ``train.txt``; ``dev.txt``, ``valid.txt`` or
``testa.txt``; ``test.txt`` or ``testb.txt``. One token a line with its word in the first column and
its tag in the last, a blank line between sentences, ``-DOCSTART-`` lines skipped. With no
``data_dir`` the splits come from the Hub (``eriktks/conll2003``).

Contract with the trainer: ``predict(rows)`` runs the model on ``rows`` (in order) and returns a dict
of tensors concatenated over batches with ``logits`` of shape ``(n_rows, seq, num_labels)``, padded on
the right to a common length (a bare logits tensor or a model output with ``.logits`` is accepted
too). Padding positions are never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .base import Features, Task, TaskDataError, read_lines

HUB_PATH = "eriktks/conll2003"
_FILES = {"train": ("train.txt",), "dev": ("dev.txt", "valid.txt", "testa.txt"), "test": ("test.txt", "testb.txt")}
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass
class TokenExample:
    tokens: list[str]
    tags: list[str]


def token_logits(output: Any) -> torch.Tensor:
    """The ``(n_rows, seq, num_labels)`` logits in what ``predict(rows)`` returned (dict, model output or tensor)."""
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise ValueError(f"predict(rows) for token classification must give 'logits', got keys {list(output)}")
        output = output["logits"]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    logits = torch.as_tensor(output)
    if logits.dim() != 3:
        raise ValueError(f"token logits must be (n_rows, seq, num_labels); got shape {tuple(logits.shape)}")
    return logits.detach().float().cpu()


def read_conll(path: Path) -> list[TokenExample]:
    """Sentences of a CoNLL column file: word in the first column, tag in the last."""
    out: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line_no, line in enumerate(read_lines(path), start=1):
        cols = line.split()
        if not cols:
            if tokens:
                out.append(TokenExample(tokens, tags))
                tokens, tags = [], []
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2:
            raise TaskDataError(f"{path}:{line_no}: one column ({line.strip()!r}); CoNLL lines need the word "
                                "first and the tag last, separated by whitespace")
        tokens.append(cols[0])
        tags.append(cols[-1])
    if tokens:
        out.append(TokenExample(tokens, tags))
    return out


class NerTask(Task):
    """CoNLL-style NER. Labels: "O" then the training tags sorted. Scores: entity precision, recall, F1 (main)."""

    name = "ner"
    kind = "token"
    main_metric = "f1"
    metric_names = ("f1", "precision", "recall")

    def __init__(self) -> None:
        self.labels: tuple[str, ...] | None = None

    # --- data ------------------------------------------------------------------------------------

    def set_labels(self, train: Sequence[TokenExample]) -> tuple[str, ...]:
        """The label set of a training split: "O" first, then its other tags sorted."""
        self.labels = ("O", *sorted({t for ex in train for t in ex.tags} - {"O"}))
        return self.labels

    def load(self, split: str, data_dir: str | None) -> list[TokenExample]:
        if split not in self.splits:
            raise TaskDataError(f"unknown split {split!r}; use one of {self.splits}")
        examples, where = self._examples(split, data_dir)
        if split == "train":
            self.set_labels(examples)
        elif self.labels is None:
            self.set_labels(self._examples("train", data_dir)[0])
        assert self.labels is not None
        known = set(self.labels)
        for n, ex in enumerate(examples, start=1):
            unknown = sorted(set(ex.tags) - known)
            if unknown:
                raise TaskDataError(f"{where}, sentence {n}: tag(s) {unknown} do not occur in the training data "
                                    f"(labels: {list(self.labels)})")
        return examples

    def _examples(self, split: str, data_dir: str | None) -> tuple[list[TokenExample], str]:
        if data_dir is None:
            return self._load_hub(split), f"{HUB_PATH} [{_HUB_SPLITS[split]}]"
        folder = Path(data_dir)
        for name in _FILES[split]:
            if (folder / name).exists():
                return read_conll(folder / name), str(folder / name)
        tried = " or ".join(str(folder / name) for name in _FILES[split])
        raise TaskDataError(f"missing data file {tried}; point --data-dir at the folder of the CoNLL files")

    def _load_hub(self, split: str) -> list[TokenExample]:
        from .hub import load_hub_split

        data = load_hub_split(HUB_PATH, None, _HUB_SPLITS[split])
        names = data.features["ner_tags"].feature.names
        return [TokenExample(list(item["tokens"]), [names[t] for t in item["ner_tags"]])
                for item in data if item["tokens"]]

    def texts(self, examples: Sequence[TokenExample]) -> list[str]:
        """Each sentence's tokens joined by spaces (CoNLL files keep no original spacing)."""
        return [" ".join(ex.tokens) for ex in examples]

    def model_kwargs(self, train_examples: Sequence[TokenExample]) -> dict[str, Any]:
        labels = self.labels if self.labels is not None else self.set_labels(train_examples)
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}}

    def auto_model_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    # --- features --------------------------------------------------------------------------------

    def featurize(self, examples: Sequence[TokenExample], tokenizer: Any, max_length: int) -> Features:
        """Words split into sub-tokens (truncated to ``max_length``); only each word's first sub-token is labelled.

        ``labels`` holds the tag index at a word's first sub-token and -100 elsewhere (special tokens,
        later sub-tokens). ``extra["word_ids"][r]`` maps row r's tokens to word indices (None: special).
        """
        if self.labels is None:
            raise TaskDataError("NER labels are unknown: load the train split (or call model_kwargs) first")
        if not getattr(tokenizer, "is_fast", False):
            raise TaskDataError("NER features need a fast tokenizer (word ids); use a model with a tokenizer.json")
        if not examples:
            return Features([], {"word_ids": []})
        index = {label: i for i, label in enumerate(self.labels)}
        enc = tokenizer([ex.tokens for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        rows, all_word_ids = [], []
        for r, ex in enumerate(examples):
            word_ids = enc.word_ids(r)
            labels, previous = [], None
            for w in word_ids:
                if w is None or w == previous:
                    labels.append(-100)
                else:
                    if ex.tags[w] not in index:
                        raise TaskDataError(f"tag {ex.tags[w]!r} is not one of the task's labels {list(self.labels)}")
                    labels.append(index[ex.tags[w]])
                previous = w
            row = {k: torch.tensor(enc[k][r]) for k in enc}
            row["labels"] = torch.tensor(labels)
            rows.append(row)
            all_word_ids.append(word_ids)
        return Features(rows, {"word_ids": all_word_ids})

    # --- scoring ---------------------------------------------------------------------------------

    def predicted_tags(self, features: Features, examples: Sequence[TokenExample], logits: torch.Tensor
                       ) -> list[list[str]]:
        """Each word's tag: the argmax at its first sub-token; words cut off by truncation get "O"."""
        assert self.labels is not None
        if logits.shape[0] != len(features.rows):
            raise ValueError(f"predict gave {logits.shape[0]} rows of logits for {len(features.rows)} features")
        best = logits.argmax(-1).tolist()
        out = []
        for r, (ex, word_ids) in enumerate(zip(examples, features.extra["word_ids"], strict=True)):
            tags = ["O"] * len(ex.tokens)
            seen = set()
            for t, w in enumerate(word_ids):
                if w is not None and w not in seen:
                    seen.add(w)
                    tags[w] = self.labels[best[r][t]]
            out.append(tags)
        return out

    def score(self, model, features: Features, examples: Sequence[TokenExample], predict) -> dict[str, float]:
        pred = self.predicted_tags(features, examples, token_logits(predict(features.rows)))
        return metrics.entity_f1(pred, [ex.tags for ex in examples])

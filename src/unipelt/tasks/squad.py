"""SQuAD 1.1 extractive question answering: loading, sliding-window features, span decoding, EM/F1.

Local data is SQuAD's own JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}]}]}]}]}``) in ``data_dir`` as ``train-v1.1.json``/
``dev-v1.1.json`` or ``train.json``/``dev.json`` (and ``test.json`` for a test split, which SQuAD
itself does not publish), or in its ``squad/`` subfolder. ``resplit-train.json``/``resplit-test.json``
are a re-split of the official dev set by article (for when SQuAD's train set is not at hand): with
them the dev split is refused (it overlaps the re-split's training articles) and runs report on
``test``. With no ``data_dir`` the splits come from the Hub (``rajpurkar/squad``).

Contract with the trainer: ``predict(rows)`` runs the model on ``rows`` (in order) and returns a dict
of tensors concatenated over batches, keyed as in the model output: ``start_logits`` and
``end_logits``, each ``(n_rows, seq)`` and padded on the right to a common length with finite values.
:func:`qa_logits` also accepts a ``ModelOutput``-like object with those attributes or one tensor
``(n_rows, seq, 2)``; padding positions are never read (only context tokens of each row are).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .base import Features, Task, TaskDataError

HUB_PATH = "rajpurkar/squad"
_FILES = {"train": ("train-v1.1.json", "train.json", "resplit-train.json"), "dev": ("dev-v1.1.json", "dev.json"),
          "test": ("test.json", "resplit-test.json")}
RESPLIT_TRAIN = "resplit-train.json"  # cut from dev-v1.1.json: with it, dev is not held-out data
_HUB_SPLITS = {"train": "train", "dev": "validation"}


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]  # every reference answer (dev has several); empty for unlabelled data
    answer_starts: list[int]  # character offset of each answer in ``context``


def qa_logits(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start_logits, end_logits)``, each ``(n_rows, seq)`` float, from what ``predict(rows)`` returned.

    Accepted: a mapping with ``start_logits`` and ``end_logits`` (the contract), an object with those
    attributes (a model output), or a single tensor ``(n_rows, seq, 2)`` stacking start and end.
    """
    if isinstance(output, Mapping):
        if "start_logits" not in output or "end_logits" not in output:
            raise ValueError(f"predict(rows) for QA must give 'start_logits' and 'end_logits', got keys {list(output)}")
        start, end = output["start_logits"], output["end_logits"]
    elif hasattr(output, "start_logits") and hasattr(output, "end_logits"):
        start, end = output.start_logits, output.end_logits
    elif isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[-1] == 2:
        start, end = output[..., 0], output[..., 1]
    else:
        raise ValueError("predict(rows) for QA must give start_logits/end_logits (a dict or model output) "
                         f"or a tensor (n_rows, seq, 2); got {type(output).__name__}")
    start, end = torch.as_tensor(start), torch.as_tensor(end)
    if start.shape != end.shape or start.dim() != 2:
        raise ValueError(f"start and end logits must both be (n_rows, seq); got {tuple(start.shape)} and "
                         f"{tuple(end.shape)}")
    return start.detach().float().cpu(), end.detach().float().cpu()


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise TaskDataError(f"{path}: {where} lacks key {key!r} (SQuAD layout: data[].paragraphs[].qas[].answers[])")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskDataError(f"{path}: {where}.{key} should be {names}, got {type(value).__name__}")
    return value


def _check_answer(context: str, text: str, start: int, where: str) -> None:
    if not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text:
        found = context[max(start, 0):max(start, 0) + len(text)]
        raise TaskDataError(f"{where}: answer {text!r} does not occur at answer_start {start} of its context "
                            f"(the context there reads {found!r})")


def parse_squad(path: Path) -> list[QAExample]:
    """The questions of one SQuAD JSON file, each answer checked against its context."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not JSON ({e})") from e
    except RecursionError as e:
        raise TaskDataError(f"{path}: not JSON of SQuAD's layout (nested too deep to parse)") from e
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:  # a folder where the file should be, an unreadable file
        raise TaskDataError(f"{path} cannot be read ({e})") from e
    articles = _need(doc, "data", list, "the top level", path)
    out = []
    for i, article in enumerate(articles):
        for j, para in enumerate(_need(article, "paragraphs", list, f"data[{i}]", path)):
            where = f"data[{i}].paragraphs[{j}]"
            context = _need(para, "context", str, where, path)
            for k, qa in enumerate(_need(para, "qas", list, where, path)):
                wq = f"{where}.qas[{k}]"
                qid = _need(qa, "id", (str, int), wq, path)
                question = _need(qa, "question", str, wq, path)
                answers = _need(qa, "answers", list, wq, path) if isinstance(qa, dict) and "answers" in qa else []
                texts, starts = [], []
                for a, ans in enumerate(answers):
                    wa = f"{wq}.answers[{a}]"
                    text = _need(ans, "text", str, wa, path)
                    start = _need(ans, "answer_start", int, wa, path)
                    _check_answer(context, text, start, f"{path}: {wa}")
                    texts.append(text)
                    starts.append(start)
                out.append(QAExample(str(qid), question, context, texts, starts))
    return out


class SquadTask(Task):
    """SQuAD 1.1: answer a question with a span of its context. Scores: exact match and F1 (main), in percent."""

    name = "squad"
    kind = "qa"
    main_metric = "f1"
    metric_names = ("exact_match", "f1")
    max_length = 384  # the usual window for SQuAD with BERT-sized models

    def __init__(self, n_best: int = 20, max_answer_tokens: int = 30):
        self.n_best = n_best
        self.max_answer_tokens = max_answer_tokens

    # --- data ------------------------------------------------------------------------------------

    def data_folder(self, data_dir: str) -> Path:
        """``data_dir``, or its ``squad/`` subfolder when ``data_dir`` holds none of SQuAD's files (a data root)."""
        folder = Path(data_dir)
        if not any((folder / name).exists() for names in _FILES.values() for name in names) and \
                (folder / "squad").is_dir():
            folder = folder / "squad"
        return folder

    @staticmethod
    def _file(folder: Path, split: str) -> Path | None:
        return next((folder / name for name in _FILES[split] if (folder / name).exists()), None)

    def default_report_split(self, data_dir: str | None) -> str:
        """``test`` where the data has a test file (the re-split's, whose dev overlaps its train), else ``dev``."""
        if data_dir is None:
            return "dev"
        return "test" if self._file(self.data_folder(data_dir), "test") is not None else "dev"

    def load(self, split: str, data_dir: str | None) -> list[QAExample]:
        if split not in self.splits:
            raise TaskDataError(f"unknown split {split!r}; use one of {self.splits}")
        if data_dir is None:
            return self._load_hub(split)
        folder = self.data_folder(data_dir)
        train = self._file(folder, "train")
        if split == "dev" and train is not None and train.name == RESPLIT_TRAIN:
            raise TaskDataError(f"{train} is a re-split cut from dev-v1.1.json, so the dev split overlaps its training "
                                f"articles; report on the test split ({folder / 'resplit-test.json'}) instead")
        path = train if split == "train" else self._file(folder, split)
        if path is not None:
            examples = parse_squad(path)
            unanswered = [ex.id for ex in examples if not ex.answers]
            # the trainer batches rows alike: answers on every question, or (a test split) on none
            if unanswered and (split != "test" or len(unanswered) < len(examples)):
                raise TaskDataError(f"{path}: question {unanswered[0]!r} has no answers; give every question of the "
                                    f"{split} split its answers" + ("" if split != "test" else ", or none"))
            return examples
        if split == "test":
            raise TaskDataError(f"SQuAD 1.1 publishes no test set and neither {folder / 'test.json'} nor "
                                f"{folder / 'resplit-test.json'} exists; report on the dev split, or put a "
                                f"SQuAD-format test.json in {folder}")
        tried = " or ".join(str(folder / name) for name in _FILES[split])
        raise TaskDataError(f"missing data file {tried}; point --data-dir at the folder holding SQuAD's JSON files")

    def texts(self, examples: Sequence[QAExample]) -> list[str]:
        """Each distinct context once (in first-seen order), then the questions: a context repeats per question."""
        contexts = list(dict.fromkeys(ex.context for ex in examples))
        return [*contexts, *(ex.question for ex in examples)]

    def _load_hub(self, split: str) -> list[QAExample]:
        from .hub import load_hub_split

        if split not in _HUB_SPLITS:
            raise TaskDataError(f"{HUB_PATH} has no {split} split (SQuAD 1.1 publishes no test set); "
                                "report on dev, or pass --data-dir DIR with a test.json")
        data = load_hub_split(HUB_PATH, None, _HUB_SPLITS[split])
        out = []
        for n, item in enumerate(data):
            answers = item["answers"]
            texts, starts = list(answers["text"]), [int(s) for s in answers["answer_start"]]
            for text, start in zip(texts, starts, strict=True):
                _check_answer(item["context"], text, start, f"{HUB_PATH} [{_HUB_SPLITS[split]}] row {n}")
            out.append(QAExample(str(item["id"]), item["question"], item["context"], texts, starts))
        return out

    def auto_model_class(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    # --- features --------------------------------------------------------------------------------

    def featurize(self, examples: Sequence[QAExample], tokenizer: Any, max_length: int) -> Features:
        """Question + context windows of ``max_length`` tokens overlapping by ``max_length // 4``.

        A long context gives several rows. Rows of examples with an answer carry ``start_positions``
        and ``end_positions`` of the first answer's tokens, or 0 (the first, CLS, token) for both when
        the answer is not wholly inside the window. ``extra["example_index"][r]`` is row r's example and
        ``extra["offsets"][r]`` its tokens' character spans in the context, ``None`` outside the context.
        """
        if not getattr(tokenizer, "is_fast", False):
            raise TaskDataError("SQuAD features need a fast tokenizer (offset mappings); load the model's "
                                "tokenizer.json, or use a model that has one")
        if not examples:
            return Features([], {"example_index": [], "offsets": []})
        n_special = tokenizer.num_special_tokens_to_add(pair=True)
        q_limit = (max_length - n_special) // 2
        if q_limit < 1:
            raise TaskDataError(f"max_length {max_length} is too short for a question and its context")
        questions, longest_q = self._clip_questions([ex.question.lstrip() for ex in examples], tokenizer, q_limit)
        room = max_length - n_special - longest_q  # context tokens per window, at least q_limit
        stride = max(0, min(max_length // 4, room - 1))
        enc = tokenizer(questions, [ex.context for ex in examples], truncation="only_second", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        rows, example_index, all_offsets = [], [], []
        for r in range(len(enc["input_ids"])):
            i = enc["overflow_to_sample_mapping"][r]
            seq_ids = enc.sequence_ids(r)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][r], seq_ids, strict=True)]
            row = {k: torch.tensor(enc[k][r]) for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")}
            ex = examples[i]
            if ex.answers:
                start, end = self._positions(offsets, ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0]))
                row["start_positions"] = torch.tensor(start)
                row["end_positions"] = torch.tensor(end)
            rows.append(row)
            example_index.append(i)
            all_offsets.append(offsets)
        return Features(rows, {"example_index": example_index, "offsets": all_offsets})

    @staticmethod
    def _clip_questions(questions: list[str], tokenizer: Any, limit: int) -> tuple[list[str], int]:
        """Questions cut after their ``limit``-th token (so a window always has room for context), and the
        most tokens any of them has."""
        enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        out, longest = [], 0
        for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"], strict=True):
            if len(ids) > limit:
                q = q[:offsets[limit - 1][1]]
                ids = tokenizer(q, add_special_tokens=False)["input_ids"]
            out.append(q)
            longest = max(longest, len(ids))
        return out, longest

    @staticmethod
    def _positions(offsets: list[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int]:
        """Token indices of the answer ``[start_char, end_char)`` in a window, or (0, 0) if it is not inside."""
        context = [t for t, o in enumerate(offsets) if o is not None]
        if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
            return 0, 0
        start = max(t for t in context if offsets[t][0] <= start_char)
        end = min(t for t in context if t >= start and offsets[t][1] >= end_char)
        return start, end

    # --- scoring ---------------------------------------------------------------------------------

    def best_answers(self, features: Features, examples: Sequence[QAExample], start_logits: torch.Tensor,
                     end_logits: torch.Tensor) -> list[str]:
        """Each example's answer text: the best span over all of its windows.

        A span starts and ends on context tokens of one window, among that window's ``n_best`` highest
        start and end logits, with ``start <= end`` and at most ``max_answer_tokens`` tokens; its score
        is start logit + end logit. An example without any such span answers "".
        """
        if start_logits.shape[0] != len(features.rows):
            raise ValueError(f"predict gave {start_logits.shape[0]} rows of logits for {len(features.rows)} features")
        best: list[tuple[float, str] | None] = [None] * len(examples)
        for r, (i, offsets) in enumerate(zip(features.extra["example_index"], features.extra["offsets"], strict=True)):
            context_tokens = torch.tensor([t for t, o in enumerate(offsets) if o is not None], dtype=torch.long)
            if len(context_tokens) == 0:
                continue
            k = min(self.n_best, len(context_tokens))
            s_val, s_pos = start_logits[r, context_tokens].topk(k)
            e_val, e_pos = end_logits[r, context_tokens].topk(k)
            starts = list(zip(s_val.tolist(), context_tokens[s_pos].tolist(), strict=True))
            ends = list(zip(e_val.tolist(), context_tokens[e_pos].tolist(), strict=True))
            for sv, s in starts:
                for ev, e in ends:
                    if e < s or e - s + 1 > self.max_answer_tokens:
                        continue
                    if best[i] is None or sv + ev > best[i][0]:
                        best[i] = (sv + ev, examples[i].context[offsets[s][0]:offsets[e][1]])
        return ["" if b is None else b[1] for b in best]

    def score(self, model, features: Features, examples: Sequence[QAExample], predict) -> dict[str, float]:
        if any(not ex.answers for ex in examples):
            raise TaskDataError(f"{self.name}: this split has questions without answers to score against")
        start, end = qa_logits(predict(features.rows))
        answers = self.best_answers(features, examples, start, end)
        return metrics.squad_scores(answers, [ex.answers for ex in examples])

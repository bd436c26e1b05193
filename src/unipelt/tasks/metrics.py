"""Task metrics, written from their definitions: GLUE's, SQuAD's official EM/F1, entity-level F1.

Every function takes plain Python sequences and returns floats, so they are easy to check by hand.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence


def accuracy(pred: Sequence, gold: Sequence) -> float:
    _same_length(pred, gold)
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def _same_length(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need equally many predictions and labels (got {len(pred)} and {len(gold)})")


def f1_binary(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE's F1 for MRPC and QQP)."""
    _same_length(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold, strict=True))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_macro(pred: Sequence, gold: Sequence) -> float:
    """Mean over the classes seen in gold or predictions of each class's F1."""
    _same_length(pred, gold)
    classes = sorted(set(gold) | set(pred), key=str)
    return sum(f1_binary(pred, gold, c) for c in classes) / len(classes)


def f1_micro(pred: Sequence, gold: Sequence) -> float:
    """Micro F1 over classes; for single-label classification it equals accuracy."""
    return accuracy(pred, gold)


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation coefficient for binary labels (GLUE's metric for CoLA)."""
    _same_length(pred, gold)
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold, strict=True))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


# --- SQuAD 1.1 ---------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, truths: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)


def squad_f1(prediction: str, truths: Sequence[str]) -> float:
    def one(truth: str) -> float:
        p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
        common = collections.Counter(p) & collections.Counter(t)
        same = sum(common.values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(t)
        return 2 * precision * recall / (precision + recall)

    return max(one(t) for t in truths)


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """EM and F1 in percent, as the official SQuAD 1.1 script reports them."""
    _same_length(predictions, truths)
    em = sum(squad_exact(p, t) for p, t in zip(predictions, truths, strict=True)) / len(truths)
    f1 = sum(squad_f1(p, t) for p, t in zip(predictions, truths, strict=True)) / len(truths)
    return {"exact_match": 100.0 * em, "f1": 100.0 * f1}


# --- NER ------------------------------------------------------------------------------------------

def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) from BIO/IOB1 tags, conlleval's rules.

    A span starts at ``B-X``, or at ``I-X`` that does not continue a span of type X; it ends where
    a tag is ``O``, a ``B-``, or of another type.
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, t = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and kind == t
        if start is not None and not continues:
            spans.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def entity_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 over sentences (an entity counts only if exact)."""
    _same_length(pred, gold)
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold, strict=True):
        ps = {(k, s, e) for k, s, e in entities(p)}
        gs = {(k, s, e) for k, s, e in entities(g)}
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}

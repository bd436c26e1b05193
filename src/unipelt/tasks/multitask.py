"""Several tasks trained at once (``--task sst2,rte,mrpc``): one task over the union, rows tagged by task.

Each example is ``(task index, example)``; features carry ``task_ids`` (the row's task index), which
routed methods (``poly``, ``poly_s``, ``poly_mu``) read from the model call. K-shot and hold-out
sampling happen per task, so every task gets K training and K validation examples. The tasks share the
model's head: they must have the same number of labels (sst2, rte, mrpc, qqp, qnli, cola: 2). Scores
are each task's metrics (``"rte/accuracy"``) and their main metrics' mean (``"mean"``), the metric that
early stopping and the report follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Features, Task, TaskDataError, hold_out, k_shot


class MultiTask(Task):
    kind = "classification"
    main_metric = "mean"
    greater_is_better = True

    def __init__(self, tasks: list[Task]):
        if len(tasks) < 2:
            raise TaskDataError("several tasks need at least two names, e.g. --task sst2,rte")
        if len({t.name for t in tasks}) != len(tasks):
            raise TaskDataError(f"a task is named twice in {[t.name for t in tasks]}")
        bad = [t.name for t in tasks if t.kind != "classification" or not t.greater_is_better]
        if bad:
            raise TaskDataError(f"training several tasks at once takes classification tasks; {bad} are not")
        self.tasks = tasks
        self.name = ",".join(t.name for t in tasks)

    def load(self, split: str, data_dir: str | None) -> list[tuple[int, Any]]:
        return [(i, ex) for i, task in enumerate(self.tasks) for ex in task.load(split, data_dir)]

    def default_report_split(self, data_dir: str | None) -> str:
        """The split every task reports on; tasks that disagree (GLUE dev, a DAPT task's test) need it named."""
        splits = {task.default_report_split(data_dir) for task in self.tasks}
        if len(splits) != 1:
            raise TaskDataError(f"the tasks {self.name} report on different splits ({sorted(splits)}); "
                                "choose one with --report-split")
        return splits.pop()

    def texts(self, examples: Sequence[tuple[int, Any]]) -> list[str]:
        """Each task's text of its own examples, task after task."""
        return [text for i, task in enumerate(self.tasks) for text in task.texts([ex for t, ex in examples if t == i])]

    def sample(self, examples: Sequence[tuple[int, Any]], k: int | None, seed: int) -> tuple[list, list]:
        """K-shot (or hold-out) training and validation samples, drawn per task."""
        train, val = [], []
        for i in range(len(self.tasks)):
            own = [ex for t, ex in examples if t == i]
            tr, va = k_shot(own, k, seed) if k is not None else hold_out(own, seed)
            train += [(i, ex) for ex in tr]
            val += [(i, ex) for ex in va]
        return train, val

    def model_kwargs(self, train_examples: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        kwargs = [task.model_kwargs([ex for t, ex in train_examples if t == i]) for i, task in enumerate(self.tasks)]
        labels = {k.get("num_labels") for k in kwargs}
        if len(labels) != 1:
            raise TaskDataError(f"the tasks {self.name} have different numbers of labels "
                                f"({[k.get('num_labels') for k in kwargs]}); tasks trained together share the head")
        return {"num_labels": labels.pop()}

    def auto_model_class(self):
        return self.tasks[0].auto_model_class()

    def featurize(self, examples: Sequence[tuple[int, Any]], tokenizer: Any, max_length: int) -> Features:
        rows: list[dict[str, torch.Tensor] | None] = [None] * len(examples)
        parts = {}
        for i, task in enumerate(self.tasks):
            where = [j for j, (t, _) in enumerate(examples) if t == i]
            feats = task.featurize([examples[j][1] for j in where], tokenizer, max_length)
            if len(feats.rows) != len(where):
                raise TaskDataError(f"{task.name}: one feature row per example is needed to train it with others")
            for j, row in zip(where, feats.rows, strict=True):
                rows[j] = {**row, "task_ids": torch.tensor(i)}
            parts[i] = (where, feats)
        return Features(rows, {"parts": parts})

    def score(self, model, features: Features, examples: Sequence[tuple[int, Any]], predict) -> dict[str, float]:
        metrics: dict[str, float] = {}
        mains = []
        for i, task in enumerate(self.tasks):
            where, feats = features.extra["parts"][i]
            tagged = Features([{**row, "task_ids": torch.tensor(i)} for row in feats.rows], feats.extra)
            own = task.score(model, tagged, [examples[j][1] for j in where], predict)
            metrics.update({f"{task.name}/{name}": value for name, value in own.items()})
            mains.append(own[task.main_metric])
        metrics["mean"] = sum(mains) / len(mains)
        return metrics

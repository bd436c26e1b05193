"""Tasks: GLUE, SQuAD 1.1, CoNLL-style NER and JSONL text classification, with their metrics."""

from __future__ import annotations

from .base import Features, Task, TaskDataError, hold_out, k_shot
from .classification import DOMAIN_TASKS, GLUE_LAYOUTS, GlueTask, JsonlTask


def task_names() -> list[str]:
    return [*GLUE_LAYOUTS, "squad", "ner", "text", *DOMAIN_TASKS, "images", "digits"]


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a :class:`TaskDataError` listing the known ones."""
    if "," in name:
        from .multitask import MultiTask

        return MultiTask([get_task(part.strip()) for part in name.split(",") if part.strip()])
    key = name.lower().replace("-", "").replace("_mm", "_mm")
    key = {"sst": "sst2", "stsb": "stsb", "mnlimm": "mnli_mm", "mnli_mismatched": "mnli_mm"}.get(key, key)
    if key in GLUE_LAYOUTS:
        return GlueTask(key)
    if key in ("text", *DOMAIN_TASKS):
        return JsonlTask(key)
    if key == "squad":
        from .squad import SquadTask

        return SquadTask()
    if key == "ner":
        from .ner import NerTask

        return NerTask()
    if key in ("images", "digits"):
        from .images import DigitsTask, ImageFolderTask

        return DigitsTask() if key == "digits" else ImageFolderTask()
    raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")


__all__ = ["DOMAIN_TASKS", "Features", "GlueTask", "JsonlTask", "Task", "TaskDataError", "get_task", "hold_out",
           "k_shot", "task_names"]

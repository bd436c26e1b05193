"""Shared pieces of the fuzz suites (tests/test_fuzz_*.py): the library's own error types, the message check,
a model cache, and a count of the cases each suite tried (printed at the end of the session by conftest)."""

from __future__ import annotations

import copy
import os
from collections import Counter

import torch

import unipelt
from conftest import build
from unipelt.tasks import TaskDataError

# The errors the library documents for bad input: configs, models it cannot adapt, delta files, task data.
LIBRARY_ERRORS = (unipelt.ConfigError, unipelt.UnsupportedModelError, unipelt.DeltaFileError, TaskDataError)

# cases tried per suite, and how each ended ("attached", "ConfigError", ...): conftest prints them at the end
CASES: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()

# UNIPELT_FUZZ_SCALE=20 multiplies every suite's max_examples (a longer local hunt). CI runs with 1: the three
# suites then try 1,632 generated cases (470 configs, 762 data folders, 400 delta folders) in about 35 s on 2 CPU
# cores, and the same ones on every run (derandomize=True)
SCALE = max(1, int(os.environ.get("UNIPELT_FUZZ_SCALE", "1")))


def examples(n: int) -> int:
    return n * SCALE


def record(suite: str, outcome: str) -> None:
    CASES[suite] += 1
    OUTCOMES[(suite, outcome)] += 1


def check_message(error: BaseException) -> str:
    """A library error's message: non-empty and on one line."""
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert "\n" not in message.strip(), f"{type(error).__name__} message spans lines: {message!r}"
    return message


_PRISTINE: dict[str, torch.nn.Module] = {}


def fresh(family: str) -> torch.nn.Module:
    """A new copy of the tiny ``family`` model (built once, then deep-copied: the same weights every time)."""
    if family not in _PRISTINE:
        _PRISTINE[family] = build(family)
    return copy.deepcopy(_PRISTINE[family])


def untouched(model: torch.nn.Module) -> bool:
    """No attachment left on ``model``: no delta store, no state, no hooks of ours, everything trainable."""
    return ("unipelt_deltas" not in model._modules and "_unipelt" not in model.__dict__
            and "forward" not in vars(model) and all(p.requires_grad for p in model.parameters()))

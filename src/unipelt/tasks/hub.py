"""Loading a split from the Hugging Face Hub through ``datasets``, with a clear offline error."""

from __future__ import annotations

from typing import Any

from .base import TaskDataError


def load_hub_split(path: str, config: str | None, split: str) -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise TaskDataError("loading from the Hub needs the 'datasets' package; or pass --data-dir DIR") from e
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as e:  # network errors come in many types
        raise TaskDataError(f"could not load {path}{'/' + config if config else ''} [{split}] from the Hugging Face "
                            f"Hub ({type(e).__name__}); without internet pass --data-dir DIR with local files") from e

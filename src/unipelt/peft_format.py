"""Interop with the ``peft`` library's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

``load_peft`` attaches a unipelt LoRA on the same modules and fills it, so outputs match ``peft``'s;
``export_peft`` writes an attached, ungated unipelt LoRA in that format. Keys are
``base_model.model.<module path>.lora_A.weight`` (and ``lora_B``); a trained head is written under
``base_model.model.<head>.<param>`` and listed in ``modules_to_save``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .core import STORE, _start, add_method, attachment, deltas, detach
from .methods.lora import LoRA, LoRAConfig
from .serialization import DeltaFileError, _atomic_write, atomic_write_text

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach a ``peft`` LoRA checkpoint to ``model``."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeltaFileError(f"cannot read {folder / PEFT_CONFIG}: {e}") from e
    if cfg.get("peft_type") != "LORA":
        raise DeltaFileError(f"{folder}: only peft LoRA checkpoints load into unipelt, this one is "
                             f"{cfg.get('peft_type')!r}")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out_override") if cfg.get(k)]
    if cfg.get("bias", "none") != "none" or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or unsupported:
        raise DeltaFileError(f"{folder}: peft LoRA options bias/rank_pattern/alpha_pattern/DoRA are not supported")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        raise DeltaFileError(f"{folder}: target_modules is a regular expression ({targets!r}); "
                             f"only lists of module names are supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
    weights_path = folder / PEFT_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:
        raise DeltaFileError(f"cannot read {weights_path}: {e}") from e
    state = attachment(model) or _start(model, train_head=True)
    try:
        name = add_method(model, LoRAConfig(r=r, alpha=alpha, targets=tuple(sorted(targets)),
                                            dropout=float(cfg.get("lora_dropout", 0.0))))
        method: LoRA = deltas(model)[name]
        found = set()
        for site_key, proj in method.sites.items():
            for part in ("A", "B"):
                k = f"{_PREFIX}{proj.path}.lora_{part}.weight"
                if k not in tensors:
                    raise DeltaFileError(f"{weights_path} lacks {k}; was it saved for another model?")
                target = getattr(method.pairs[site_key], part).weight
                if tensors[k].shape != target.shape:
                    raise DeltaFileError(f"{k}: shape {tuple(tensors[k].shape)} does not fit {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensors[k])
                found.add(k)
        with torch.no_grad():
            for head_name, head in state.model_map.head_modules.items():
                own = {k[len(_PREFIX) + len(head_name) + 1:]: v for k, v in tensors.items()
                       if k.startswith(f"{_PREFIX}{head_name}.")}
                if own:
                    head.load_state_dict(own)
                    found.update(f"{_PREFIX}{head_name}.{k}" for k in own)
        left = sorted(set(tensors) - found)
        if left:
            raise DeltaFileError(f"{weights_path} has weights unipelt does not know: {left[:3]}")
    except Exception:
        detach(model)
        raise
    return model


def _target_names(model: nn.Module, paths: set[str]) -> list[str]:
    """``target_modules`` that select exactly ``paths`` in ``peft`` (which matches a name or a path suffix).

    The modules' own names (``query``, ``value``) where those select no other module, else the full paths:
    ``dense`` in BERT also names the attention output and the pooler, which this LoRA may not adapt.
    """
    names = {p.rsplit(".", 1)[-1] for p in paths}
    selected = {p for p, _ in model.named_modules()
                if p.rsplit(".", 1)[-1] in names and not p.startswith(STORE)}
    return sorted(names) if selected == paths else sorted(paths)


def export_peft(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's single ungated LoRA (and trained head) in ``peft``'s format."""
    lora = [(n, m) for n, m in deltas(model).items() if isinstance(m, LoRA)]
    others = [n for n, m in deltas(model).items() if not isinstance(m, LoRA)]
    if len(lora) != 1 or others:
        raise ConfigError(f"export_peft writes exactly one LoRA and nothing else; attached: {list(deltas(model))}")
    _, method = lora[0]
    if method.config.gate:
        raise ConfigError("a gated LoRA has no peft equivalent; train with gate=False to export")
    if any(p.out_slice is not None for p in method.sites.values()):
        raise ConfigError("this LoRA adapts slices of a fused projection (GPT-2's c_attn); peft cannot express "
                          "that: target the whole module instead (targets=('c_attn',))")
    tensors: dict[str, torch.Tensor] = {}
    paths = set()
    for site_key, proj in method.sites.items():
        pair = method.pairs[site_key]
        tensors[f"{_PREFIX}{proj.path}.lora_A.weight"] = pair.A.weight.detach().cpu().contiguous().clone()
        tensors[f"{_PREFIX}{proj.path}.lora_B.weight"] = pair.B.weight.detach().cpu().contiguous().clone()
        paths.add(proj.path)
    state = attachment(model)
    heads = sorted(state.model_map.head_modules) if state.train_head else []
    for head_name in heads:
        for k, v in state.model_map.head_modules[head_name].state_dict().items():
            tensors[f"{_PREFIX}{head_name}.{k}"] = v.detach().cpu().contiguous().clone()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "r": method.config.r, "lora_alpha": method.config.alpha,
        "target_modules": _target_names(model, paths), "lora_dropout": method.config.dropout, "bias": "none",
        "fan_in_fan_out": any(p.transposed for p in method.sites.values()), "modules_to_save": heads or None,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "task_type": None, "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
        "rank_pattern": {}, "alpha_pattern": {},
    }
    _atomic_write(folder / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder

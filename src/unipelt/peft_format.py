"""Interop with the ``peft`` library's LoRA format (``adapter_config.json`` + ``adapter_model.safetensors``).

``load_peft`` attaches a unipelt LoRA on the same modules and fills it, so outputs match ``peft``'s;
``export_peft`` writes an attached, ungated unipelt LoRA in that format. Keys are
``base_model.model.<module path>.lora_A.weight`` (and ``lora_B``; DoRA's magnitude
``<module path>.lora_magnitude_vector``, with ``use_dora``); a trained head is written under
``base_model.model.<head>.<param>`` and listed in ``modules_to_save``.

PiSSA/OLoRA (``init_lora_weights`` ``"pissa"``/``"olora"``): peft saves the trained A, B and, at load, runs
the init again on the base weight it is given (``W <- W - s B_0 A_0``) before it loads them; so does
``load_peft`` (which keeps ``W`` and the correction as unipelt's LoRA does), and ``export_peft`` writes such
a folder by default. ``export_peft(..., convert_to_lora=True)`` writes what peft's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes instead: a plain LoRA of rank 2r,
``A' = [A; A_0]``, ``B' = [B, -B_0]``, alpha doubled, for the original base weights.
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
from .core import STORE, _remove_method, _start, add_method, attachment, deltas, detach
from .methods.lora import LoRA, LoRAConfig
from .serialization import DeltaFileError, _atomic_write, atomic_write_text, one_line

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# peft inits that leave the base weight alone (the file holds every value that matters), and those that
# rebuild the residual W - s B_0 A_0 from it (unipelt's LoRA keeps W and the correction)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # and True / False
_RESIDUAL_INITS = ("pissa", "olora")
_INIT_NAMES = {"lora": True, "pissa": "pissa", "olora": "olora"}  # unipelt's init -> init_lora_weights


def _lora_init(folder: Path, value) -> str:
    """unipelt's ``init`` for peft's ``init_lora_weights``; other inits mutate the base in ways unipelt does not
    rebuild (randomised SVD, CorDA, LoftQ, LoRA-GA): refused."""
    if isinstance(value, bool) or value in _PLAIN_INITS:
        return "lora"
    if value in _RESIDUAL_INITS:
        return value
    raise DeltaFileError(f"{folder}: peft init_lora_weights={value!r} is not supported; unipelt loads True, False, "
                         f"{', '.join(_PLAIN_INITS + _RESIDUAL_INITS)} (save such an adapter as a plain LoRA with "
                         f"peft's save_pretrained(path_initial_model_for_weight_conversion=...) instead)")


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach a ``peft`` LoRA checkpoint to ``model``."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSON or UTF-8 errors; RecursionError: nested too deep
        raise DeltaFileError(f"cannot read {folder / PEFT_CONFIG}: {one_line(e)}") from e
    if not isinstance(cfg, dict):
        raise DeltaFileError(f"{folder / PEFT_CONFIG} holds a JSON {type(cfg).__name__}, not peft's config object")
    if cfg.get("peft_type") != "LORA":
        raise DeltaFileError(f"{folder}: only peft LoRA checkpoints load into unipelt, this one is "
                             f"{cfg.get('peft_type')!r}")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "fan_in_fan_out_override", "lora_bias", "use_qalora")
                   if cfg.get(k)] + (["bias"] if cfg.get("bias", "none") != "none" else [])
    if unsupported:
        raise DeltaFileError(f"{folder}: peft LoRA options {', '.join(unsupported)} are not supported (set: "
                             f"{', '.join(f'{k}={cfg.get(k)!r}' for k in unsupported)})")
    dora, lora_init = bool(cfg.get("use_dora")), _lora_init(folder, cfg.get("init_lora_weights", True))
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise DeltaFileError(f"{folder / PEFT_CONFIG} lacks {missing}; is it a peft LoRA config?")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        raise DeltaFileError(f"{folder}: target_modules is a regular expression ({targets!r}); "
                             f"only lists of module names are supported")
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)) \
            or isinstance(r, bool) or not isinstance(r, int) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, dropout)):
        raise DeltaFileError(f"{folder / PEFT_CONFIG}: r must be an integer, lora_alpha and lora_dropout numbers and "
                             f"target_modules a list of module names; got r={r!r}, lora_alpha={alpha!r}, "
                             f"lora_dropout={dropout!r}, target_modules={targets!r}")
    r, alpha = int(r), float(alpha)
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
    weights_path = folder / PEFT_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:
        raise DeltaFileError(f"cannot read {weights_path}: {one_line(e)}") from e
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise DeltaFileError(f"{weights_path} holds NaN or infinite values in {non_finite[:3]}; the file is corrupt")
    lora_config = LoRAConfig(r=r, alpha=alpha, targets=tuple(sorted(targets)), dropout=float(dropout), dora=dora,
                             init=lora_init)
    lora_config.validate()  # r >= 1, a dropout in [0, 1): a ConfigError that names the value
    fresh = attachment(model) is None
    state = attachment(model) or _start(model, train_head=True)
    heads_before = {n: {k: v.detach().clone() for k, v in h.state_dict().items()}
                    for n, h in state.model_map.head_modules.items()}
    name = None
    try:
        name = add_method(model, lora_config)
        method: LoRA = deltas(model)[name]
        found = set()
        for site_key, proj in method.sites.items():
            pair = method.pairs[site_key]
            parts = {f"{_PREFIX}{proj.path}.lora_A.weight": pair.A.weight,
                     f"{_PREFIX}{proj.path}.lora_B.weight": pair.B.weight}
            if dora:
                parts[f"{_PREFIX}{proj.path}.lora_magnitude_vector"] = pair.m
            for k, target in parts.items():
                if k not in tensors:
                    raise DeltaFileError(f"{weights_path} lacks {k}; was it saved for another model?")
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
                    try:
                        head.load_state_dict(own)
                    except RuntimeError as e:
                        raise DeltaFileError(f"{weights_path}: the saved head '{head_name}' does not fit "
                                             f"({one_line(e)})") from e
                    found.update(f"{_PREFIX}{head_name}.{k}" for k in own)
        left = sorted(set(tensors) - found)
        if left:
            raise DeltaFileError(f"{weights_path} has weights unipelt does not know: {left[:3]}")
    except Exception:
        if fresh:
            detach(model)
        else:  # the deltas attached before stay, and the head as it was
            if name is not None:
                _remove_method(model, name)
            with torch.no_grad():
                for head_name, saved in heads_before.items():
                    state.model_map.head_modules[head_name].load_state_dict(saved)
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


def export_peft(model: nn.Module, path: str | os.PathLike, convert_to_lora: bool = False) -> Path:
    """Write the model's single ungated LoRA (and trained head) in ``peft``'s format.

    DoRA goes with its magnitudes and ``use_dora``. PiSSA/OLoRA: by default as peft saves them (A, B and
    ``init_lora_weights``; peft rebuilds the residual from the base weight at load); ``convert_to_lora=True``
    writes the rank-2r plain LoRA ``[A; A_0]``, ``[B, -B_0]`` (alpha doubled) of peft's
    ``path_initial_model_for_weight_conversion``, which needs no init at load.
    """
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
    lora_init, dora = method.config.init, method.config.dora
    convert = convert_to_lora and lora_init != "lora"
    if lora_init == "olora" and not convert and any(p.transposed for p in method.sites.values()):
        raise ConfigError("peft's OLoRA init factors a Conv1D weight as stored, (in, out), and cannot rebuild this "
                          "adapter's residual: export with convert_to_lora=True")
    tensors: dict[str, torch.Tensor] = {}
    paths = set()
    for site_key, proj in method.sites.items():
        pair = method.pairs[site_key]
        a, b = pair.A.weight.detach(), pair.B.weight.detach()
        if convert:  # B A - B0 A0 = [B, -B0] [A; A0]
            a, b = torch.cat([a, pair.A0.to(a.dtype)]), torch.cat([b, -pair.B0.to(b.dtype)], dim=1)
        tensors[f"{_PREFIX}{proj.path}.lora_A.weight"] = a.cpu().contiguous().clone()
        tensors[f"{_PREFIX}{proj.path}.lora_B.weight"] = b.cpu().contiguous().clone()
        if dora:
            tensors[f"{_PREFIX}{proj.path}.lora_magnitude_vector"] = pair.m.detach().cpu().contiguous().clone()
        paths.add(proj.path)
    r, alpha = method.config.r, method.config.alpha
    if convert:
        r, alpha = 2 * r, 2 * alpha
    state = attachment(model)
    heads = sorted(state.model_map.head_modules) if state.train_head else []
    for head_name in heads:
        for k, v in state.model_map.head_modules[head_name].state_dict().items():
            tensors[f"{_PREFIX}{head_name}.{k}"] = v.detach().cpu().contiguous().clone()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "target_modules": _target_names(model, paths), "lora_dropout": method.config.dropout, "bias": "none",
        "fan_in_fan_out": any(p.transposed for p in method.sites.values()), "modules_to_save": heads or None,
        "use_rslora": False, "use_dora": dora, "init_lora_weights": True if convert else _INIT_NAMES[lora_init],
        "inference_mode": True,
        "task_type": None, "base_model_name_or_path": getattr(model.config, "_name_or_path", None),
        "rank_pattern": {}, "alpha_pattern": {},
    }
    _atomic_write(folder / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder

"""Combining several deltas of the same method into one: ``unipelt.combine([...], weights=[...], out=folder)``.

Each delta is read as a *task vector* ``tau``, coordinates in which its effect on the merged weights is linear:

- ``bitfit``: the bias deltas; ``ln``: the gain and bias deltas (what ``save`` stores); the combined delta is
  made of the combined tensors;
- ``ia3``: ``tau = l - 1`` for each scale vector ``l`` (``diag(l) W - W = diag(l - 1) W``); the combined scale is
  ``1 + combined tau``. peft's ``add_weighted_adapter`` sums the vectors ``l`` themselves, which is the same only
  when the weights sum to one;
- ``lora``: ``tau = Delta W = (alpha / r) B A`` per projection. A sum of such products is not one of them at the
  same rank: ``linear`` is exact by concatenation, ``A = [A_1; A_2; ...]`` (rows), ``B = [w_1 s_1 B_1, w_2 s_2
  B_2, ...]`` (columns) with ``r = sum r_i``, ``alpha = r`` (scale 1), so ``B A = sum_i w_i s_i B_i A_i`` (peft's
  ``cat``; peft's ``linear`` sums the A's and the B's separately, which adds cross terms). Every other method
  forms its ``Delta W`` and factors it back by SVD at ``rank`` (default: the largest ``r_i``): ``Delta W = U S V^T``,
  ``B = U_k S_k^(1/2)``, ``A = S_k^(1/2) V_k^T``, ``alpha = r = k``: the best rank-k approximation (exact when k
  reaches the rank of ``Delta W``). These are peft's ``*_svd`` variants, ``svd`` being its ``svd`` (peft
  ``tuners/lora/model.py``, ``_svd_generalized_task_arithmetic_weighted_adapter``, as read: it puts ``B = U_k S_k``,
  ``A = V_k^T``, and multiplies each weight by the adapter's scale on top of ``get_delta_weight``, which already
  holds it; here the scale enters once).

The methods, on each tensor (each projection's ``Delta W`` for LoRA), with weights ``w_i``:

- ``linear`` (task arithmetic, Ilharco et al. 2023): ``sum_i w_i tau_i``; ``svd`` the same, LoRA factored at ``rank``;
- ``ties`` (Yadav et al. 2023, TIES-Merging): trim each ``tau_i`` to its ``round(density n)`` largest magnitudes
  (``t_i``); elect the sign ``gamma = sign(sum_i t_i)`` (+1 where the sum is 0); disjoint mean:
  ``sum_i w_i t_i [sign t_i = gamma] / max(1, #{i: sign t_i = gamma})``. With equal weights ``lambda`` this is the
  paper's ``lambda tau_m``; the sign is elected on the unweighted trimmed tensors, and each tensor is trimmed on
  its own (the paper trims a whole model's task vector at once), both as peft's ``ties``;
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, DARE): drop each entry of ``tau_i`` with probability
  ``p = 1 - density`` and rescale the kept ones by ``1 / (1 - p)``, then ``linear`` / the sign election and
  disjoint mean of ``ties``. The drops are drawn from ``torch.Generator().manual_seed(seed)``: method by method
  (in the saved order), tensor by tensor (sorted keys; LoRA: sorted projection keys), delta by delta (in the given
  order), ``keep = torch.rand(shape, generator=g, dtype=torch.float64) < density``.

Refused: methods whose merged effect is not linear in their parameters (adapters, prefixes, prompts, gated
LoRA, the Kronecker and PHM families, ...), and ``svd`` on anything but LoRA. The trained task heads are not
deltas: deltas that carry one need ``heads="drop"`` (the combined delta leaves the model's head alone) or
``heads="mean"`` (the heads' weighted mean, the weights normalised to sum 1).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ConfigError, parse_config
from .serialization import (
    DELTA_FILE,
    FORMAT,
    META_FILE,
    DeltaFileError,
    _commit_pair,
    _sha256,
    read_meta,
    save,
)

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "svd")
SUPPORTED = ("lora", "ia3", "bitfit", "ln")  # whose merged effect is linear in a task vector of theirs
# config fields that leave a method's merged effect unchanged: these may differ between the combined deltas
_FREE = {"lora": {"r", "alpha", "dropout", "fold"}}
# LoRA fields whose meaning for the merged Delta W is known; any other one must keep its default
_LORA_KNOWN = {"r", "alpha", "targets", "layers", "exclude", "dropout", "fold", "gate", "gate_pooling",
               "gate_scaling"}


@dataclass
class _Source:
    label: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _read_folder(folder: Path) -> _Source:
    meta = read_meta(folder)
    path = folder / DELTA_FILE
    if not path.exists():
        raise DeltaFileError(f"{path} is missing")
    if _sha256(path) != meta.get("delta_sha256"):
        raise DeltaFileError(f"{path} does not match {META_FILE} (corrupt, or a save was interrupted)")
    return _Source(str(folder), meta, load_file(str(path)))


def _read(source: Any, index: int, scratch: Path) -> _Source:
    if isinstance(source, nn.Module):  # an attached model: exactly what unipelt.save would write
        folder = save(source, scratch / str(index))
        read = _read_folder(folder)
        read.label = f"<attached model {index}>"
        return read
    if isinstance(source, (str, os.PathLike)):
        return _read_folder(Path(source))
    raise ConfigError(f"combine takes saved-delta folders or attached models, got {type(source).__name__}")


# ------------------------------------------------------------------------------------------- the formulas


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: ``tau`` with only its ``round(density * numel)`` largest magnitudes kept."""
    k = round(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    if k:
        keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view(tau.shape)


def drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability ``density`` and divided by it."""
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return tau * keep / density


def combine_tensors(taus: list[torch.Tensor], weights: list[float], method: str, density: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from the task vectors ``taus`` (same shape) by ``method`` (see the module's docstring)."""
    if method in ("ties", "dare_ties", "dare_linear"):
        taus = [trim(t, density) if method == "ties" else drop(t, density, generator) for t in taus]
    w = torch.tensor(weights, dtype=taus[0].dtype).view(-1, *([1] * taus[0].dim()))
    stacked = torch.stack(taus)
    if method in ("linear", "svd", "dare_linear"):
        return (w * stacked).sum(0)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    return (w * stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def refactor(delta_w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of rank ``rank`` with ``B A`` the best rank-``rank`` approximation of ``delta_w`` (SVD)."""
    u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


# ------------------------------------------------------------------------------------------- per method


def _lora_sites(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[len("pairs."):-len(".A.weight")] for k in tensors if k.startswith("pairs.") and
                  k.endswith(".A.weight"))


def _combine_lora(name: str, configs: list[dict], own: list[dict[str, torch.Tensor]], weights: list[float],
                  method: str, density: float | None, rank: int | None, generator: torch.Generator
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    sites = _lora_sites(own[0])
    expected = {f"pairs.{s}.{m}.weight" for s in sites for m in "AB"}
    for tensors in own:
        if set(tensors) != expected:
            raise DeltaFileError(f"the lora deltas '{name}' hold other tensors than pairs.<site>.A/B.weight of the "
                                 f"same sites (unexpected {sorted(set(tensors) ^ expected)[:4]})")
    scales = [c["alpha"] / c["r"] for c in configs]
    dtype = own[0][f"pairs.{sites[0]}.A.weight"].dtype
    out: dict[str, torch.Tensor] = {}
    if method == "linear":  # exact: concatenated factors, rank sum r_i, scale 1
        new_rank = sum(c["r"] for c in configs)
        for s in sites:
            out[f"pairs.{s}.A.weight"] = torch.cat([t[f"pairs.{s}.A.weight"] for t in own]).to(dtype)
            out[f"pairs.{s}.B.weight"] = torch.cat([t[f"pairs.{s}.B.weight"].double() * (w * sc)
                                                    for t, w, sc in zip(own, weights, scales, strict=True)],
                                                   dim=1).to(dtype)
    else:
        new_rank = rank or max(c["r"] for c in configs)
        for s in sites:
            taus = [(t[f"pairs.{s}.B.weight"].double() @ t[f"pairs.{s}.A.weight"].double()) * sc
                    for t, sc in zip(own, scales, strict=True)]
            if new_rank > min(taus[0].shape):
                raise ConfigError(f"rank={new_rank} does not fit lora '{name}' site {s} "
                                  f"({taus[0].shape[1]} -> {taus[0].shape[0]}); use rank <= {min(taus[0].shape)}")
            b, a = refactor(combine_tensors(taus, weights, method, density, generator), new_rank)
            out[f"pairs.{s}.A.weight"], out[f"pairs.{s}.B.weight"] = a.to(dtype), b.to(dtype)
    config = {**configs[0], "r": new_rank, "alpha": float(new_rank)}
    return config, out


def _combine_vectors(name: str, kind: str, own: list[dict[str, torch.Tensor]], weights: list[float], method: str,
                     density: float | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """bitfit, ln: the saved tensors are the task vectors; ia3: the scales minus one."""
    keys = sorted(own[0])
    for tensors in own:
        if sorted(tensors) != keys:
            raise DeltaFileError(f"the {kind} deltas '{name}' hold different tensors "
                                 f"(unexpected {sorted(set(tensors) ^ set(keys))[:4]}); made for other models?")
    offset = 1.0 if kind == "ia3" else 0.0
    out = {}
    for k in keys:
        taus = [t[k].double() - offset for t in own]
        out[k] = (combine_tensors(taus, weights, method, density, generator) + offset).to(own[0][k].dtype)
    return out


def _check_configs(name: str, configs: list[dict], labels: list[str]) -> None:
    kind = configs[0]["method"]
    if kind not in SUPPORTED or configs[0].get("gate"):
        what = f"gated {kind}" if kind in SUPPORTED else repr(kind)
        raise ConfigError(f"cannot combine {what} deltas ('{name}'): their effect is not linear in their parameters; "
                          f"combine takes {', '.join(SUPPORTED)} (ungated)")
    if kind == "lora":
        default = parse_config("lora").to_dict()
        odd = sorted(k for k, v in configs[0].items() if k not in _LORA_KNOWN and k != "method"
                     and v != default.get(k))
        if odd:
            raise ConfigError(f"cannot combine lora '{name}' with {odd} set: combine knows the delta (alpha / r) B A "
                              f"only")
    free = _FREE.get(kind, set())
    first = {k: v for k, v in configs[0].items() if k not in free}
    for config, label in zip(configs[1:], labels[1:], strict=True):
        if {k: v for k, v in config.items() if k not in free} != first:
            diff = sorted(k for k in set(first) | set(config) if k not in free and first.get(k) != config.get(k))
            raise ConfigError(f"'{name}' of {label} differs from {labels[0]}'s in {diff}; combined deltas must have "
                              f"the same config (up to {sorted(free) or 'nothing'})")


# ------------------------------------------------------------------------------------------- the API


def combine(deltas: list[Any], weights: list[float] | None = None, method: str = "linear", *,
            out: str | os.PathLike, density: float | None = None, rank: int | None = None, seed: int = 0,
            heads: str | None = None) -> Path:
    """Combine ``deltas`` (saved-delta folders or attached models, of one base model and the same methods) into
    one delta saved in folder ``out``, which ``unipelt.load`` reads; returns ``out``.

    ``weights``: one per delta (default: equal, summing to 1). ``method``: ``"linear"`` (every supported method),
    ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` (need ``density``, the fraction kept), ``"svd"`` (LoRA only).
    ``rank``: the combined LoRA's rank for every method but ``linear`` (default: the largest of theirs);
    ``linear`` is exact at the sum of the ranks. ``seed``: DARE's drops. ``heads``: ``"drop"`` or ``"mean"``,
    needed when the deltas carry trained task heads. The formulas are in this module's docstring.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown combine method {method!r}; choose one of {', '.join(METHODS)}")
    sources = list(deltas)
    if not sources:
        raise ConfigError("combine needs at least one delta")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"combine needs one finite weight per delta: {len(sources)} deltas, weights {weights}")
    if method in ("ties", "dare_linear", "dare_ties"):
        if density is None or not 0.0 < float(density) <= 1.0:
            raise ConfigError(f"method {method!r} needs density in (0, 1] (the fraction of entries kept), "
                              f"got {density!r}")
        density = float(density)
    elif density is not None:
        raise ConfigError(f"density applies to ties, dare_linear and dare_ties, not to {method!r}")
    if rank is not None and method == "linear":
        raise ConfigError("linear is exact at the sum of the LoRA ranks; to truncate to rank=k use method='svd'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if heads not in (None, "drop", "mean"):
        raise ConfigError(f"heads must be 'drop' or 'mean', got {heads!r}")

    with tempfile.TemporaryDirectory(prefix="unipelt-combine-") as scratch:
        read = [_read(s, i, Path(scratch)) for i, s in enumerate(sources)]
    labels = [r.label for r in read]
    base = read[0].meta["base_model"]
    for r in read[1:]:
        other = r.meta["base_model"]
        if (other["class"], other["config_hash"]) != (base["class"], base["config_hash"]):
            raise DeltaFileError(f"{r.label} was saved for {other['class']} (config {other['config_hash']}), "
                                 f"{labels[0]} for {base['class']} (config {base['config_hash']}): deltas of one "
                                 f"base model only")
    entries = [[(m["name"], m["config"]["method"]) for m in r.meta["methods"]] for r in read]
    for r, e in zip(read[1:], entries[1:], strict=True):
        if e != entries[0]:
            raise ConfigError(f"{r.label} holds the methods {e}, {labels[0]} holds {entries[0]}: combined deltas must "
                              f"hold the same methods")

    configs = [[parse_config(r.meta["methods"][i]["config"]).to_dict() for r in read] for i in range(len(entries[0]))]
    for (name, _), per_delta in zip(entries[0], configs, strict=True):
        _check_configs(name, per_delta, labels)
    kinds = sorted({kind for _, kind in entries[0]})
    if method == "svd" and kinds != ["lora"]:
        raise ConfigError(f"method 'svd' factors LoRA deltas; these are {kinds}: use linear, ties or dare_*")
    if rank is not None and "lora" not in kinds:
        raise ConfigError(f"rank sets the rank of combined LoRA deltas; these are {kinds}")

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    methods = []
    for (name, kind), per_delta in zip(entries[0], configs, strict=True):
        prefix = f"{name}."
        own = [{k[len(prefix):]: v for k, v in r.tensors.items() if k.startswith(prefix)} for r in read]
        if kind == "lora":
            config, combined = _combine_lora(name, per_delta, own, weights, method, density, rank, generator)
        else:
            config, combined = per_delta[0], _combine_vectors(name, kind, own, weights, method, density, generator)
        tensors.update({f"{prefix}{k}": v.contiguous() for k, v in combined.items()})
        methods.append({"name": name, "config": config})

    carried = [r.meta.get("heads") or [] for r in read]
    head_names: list[str] = []
    if any(carried):
        if heads is None:
            raise ConfigError(f"these deltas carry trained task heads ({sorted({h for c in carried for h in c})}): "
                              f"pass heads='drop' (the combined delta leaves the model's head as it is) or "
                              f"heads='mean' (the heads' weighted mean)")
        if heads == "mean":
            if any(c != carried[0] for c in carried) or sum(weights) == 0:
                raise ConfigError("heads='mean' needs every delta to carry the same heads, and weights whose sum is "
                                  "not 0")
            head_names = list(carried[0])
            total = sum(weights)
            keys = sorted(k for k in read[0].tensors if k.startswith("head."))
            for k in keys:
                if any(k not in r.tensors or r.tensors[k].shape != read[0].tensors[k].shape for r in read):
                    raise DeltaFileError(f"the saved heads differ in {k!r} (another number of labels?)")
                tensors[k] = (sum(r.tensors[k].double() * (w / total) for r, w in zip(read, weights, strict=True))
                              .to(read[0].tensors[k].dtype).contiguous())

    meta: dict[str, Any] = {
        "format": FORMAT,
        "unipelt_version": __version__,
        "methods": methods,
        "train_head": bool(head_names),
        "heads": head_names,
        "base_model": base,
        "combined": {"method": method, "weights": weights, "density": density, "rank": rank, "seed": seed,
                     "heads": heads, "sources": labels},
    }
    json.dumps(meta)  # fails here, before anything is written, on a value JSON cannot hold
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    _commit_pair(folder, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}), meta)
    return folder

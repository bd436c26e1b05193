"""Deltas on the Hugging Face Hub: a model card, ``push`` through ``HfApi``, and ``load`` of ``"user/repo"``.

``unipelt.save(model, folder, push_to_hub="user/repo")`` writes the folder as always, adds a ``README.md`` model
card (base model, methods and their configs, trainable parameters, metrics), then uploads the folder's unipelt
files with ``huggingface_hub.HfApi().upload_folder``. ``unipelt.load(model, "user/repo")`` fetches a repo id that
is not a local folder with ``huggingface_hub.snapshot_download`` (the local cache first: ``HF_HUB_OFFLINE=1``
works with a cached snapshot), then loads it as a folder. ``huggingface_hub`` is imported only when used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .serialization import DeltaFileError

DELTA_FILE, META_FILE, RESULTS_FILE, CARD_FILE = "delta.safetensors", "unipelt.json", "results.json", "README.md"
# what load fetches from a repo: a unipelt delta, or a LoRA saved by peft (serialization.load reads both)
FETCHED = [META_FILE, DELTA_FILE, "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
CARD_MARKER = "<!-- written by unipelt: unipelt.save rewrites this card; remove this line to keep your own -->"
# a delta's Hub repo id: "namespace/name" (letters, digits, '-', '_', '.'; no '--' or '..', no leading '.')
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


class HubError(DeltaFileError):
    """The Hub could not be reached, the repo or revision does not exist, or the token is refused."""


def looks_like_repo_id(text: str) -> bool:
    """``"user/repo"``: one slash between two Hub names (a path that does not exist locally is read as one)."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def resolve_source(path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local folder ``load`` reads: ``path`` itself when it exists (or is no repo id), else the snapshot of the
    Hub repo ``path`` at ``revision`` (``snapshot_download``: the cache first, the Hub when it is needed)."""
    if isinstance(path, os.PathLike) or os.path.exists(path) or not looks_like_repo_id(str(path)):
        if revision is not None:
            raise HubError(f"revision={revision!r} applies to a Hub repo id, but {str(path)!r} is a local path; drop "
                           f"revision, or give the repo id as 'user/repo'")
        return Path(path)
    repo_id = str(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=FETCHED,
                                      library_name="unipelt"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        raise HubError(f"{repo_id!r} is no local folder, and fetching it from the Hub failed "
                       f"({type(e).__name__}: {reason}); check the path, the repo id and revision, and the token "
                       f"(HF_TOKEN), or go online (HF_HUB_OFFLINE=0)") from e


def push(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
         commit_message: str | None = None, revision: str | None = None) -> Any:
    """Upload the unipelt files of ``folder`` (delta, ``unipelt.json``, model card, ``results.json``) to the model
    repo ``repo_id``, creating it when missing (``private`` applies then). Returns ``upload_folder``'s commit."""
    folder = Path(folder)
    if not isinstance(repo_id, str) or not looks_like_repo_id(repo_id):
        raise HubError(f"push_to_hub={repo_id!r} is no Hub repo id; give 'user/repo'")
    files = [name for name in (META_FILE, DELTA_FILE, CARD_FILE, RESULTS_FILE) if (folder / name).is_file()]
    if META_FILE not in files or DELTA_FILE not in files:
        raise HubError(f"{folder} holds no saved delta ({META_FILE} + {DELTA_FILE}); unipelt.save the model first")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token, library_name="unipelt")
    methods = ", ".join(m["config"]["method"] for m in json.loads((folder / META_FILE).read_text())["methods"])
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=files, repo_type="model",
                                 revision=revision, commit_message=commit_message or f"unipelt delta ({methods})")
    except (HfHubHTTPError, OSError) as e:
        reason = " ".join(str(e).split())[:300]
        raise HubError(f"could not push {folder} to {repo_id!r} ({type(e).__name__}: {reason}); the delta is saved "
                       f"there: check the token (HF_TOKEN or `hf auth login`) and push again with "
                       f"unipelt.push_to_hub({str(folder)!r}, {repo_id!r})") from e


# ------------------------------------------------------------------------------------------------ model card


def read_metrics(folder: Path, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``metrics`` when given, else those of the ``results.json`` a training run wrote beside the delta."""
    if metrics is not None:
        if not isinstance(metrics, dict):
            raise HubError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}")
        return dict(metrics)
    path = folder / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(results, dict):
        return {}
    out = dict(results.get("metrics") or {}) if isinstance(results.get("metrics"), dict) else {}
    for key in ("task", "main_metric", "score"):
        if key in results and key not in out:
            out[key] = results[key]
    return out


def _delta_parameters(folder: Path, meta: dict[str, Any]) -> dict[str, int]:
    """Trainable parameters per method and head, as ``save`` recorded them; else counted from the delta file's
    tensors (frozen buffers included)."""
    recorded = meta.get("trainable_parameters")
    if isinstance(recorded, dict) and all(isinstance(v, int) for v in recorded.values()):
        return {k: v for k, v in recorded.items() if k != "total" and v}
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(folder / DELTA_FILE), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            part = "head" if key.startswith("head.") else key.split(".", 1)[0]
            counts[part] = counts.get(part, 0) + n
    return counts


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(folder: str | os.PathLike, metrics: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The ``README.md`` of a saved delta: base model, methods and configs, parameters, metrics, how to load."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    base = meta["base_model"]
    base_name = base.get("name_or_path") or base.get("model_type") or base["class"]
    methods = [m["config"]["method"] for m in meta["methods"]]
    metrics = read_metrics(folder, metrics)
    counts = _delta_parameters(folder, meta)
    total = sum(counts.values())
    front = ["---", "library_name: unipelt", "tags:", "- unipelt", *[f"- {json.dumps(m)}" for m in
                                                                      dict.fromkeys(methods)]]
    name = base.get("name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) \
            and not os.path.exists(name):  # a Hub model id, not a local path: the Hub links the card to it
        front.append(f"base_model: {json.dumps(name)}")
    front.append("---")
    title = repo_id or folder.resolve().name
    lines = [*front, CARD_MARKER, "", f"# {title}", "",
             f"A unipelt delta ({', '.join(methods)}) for the base model `{base_name}` "
             f"({base['class']}, family `{base.get('family', '?')}`). It holds only the delta"
             + (" and the trained task head" if meta.get("heads") else "") + ": load it into the base model.", "",
             "## Methods", ""]
    for m in meta["methods"]:
        lines += [f"`{m['name']}`:", "", "```json", json.dumps(m["config"], indent=2, sort_keys=True), "```", ""]
    lines += ["## Trainable parameters", "", "| part | parameters |", "|---|---:|"]
    lines += [f"| {part} | {n:,} |" for part, n in counts.items()]
    lines.append(f"| total | {total:,} |")
    if isinstance(base.get("parameters"), int) and base["parameters"] > 0:
        lines += ["", f"That is {100.0 * total / base['parameters']:.4f}% of the base model's "
                      f"{base['parameters']:,} parameters."]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_scalar(v)} |" for k, v in metrics.items()
                  if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    source = repo_id or str(folder)
    import transformers

    cls = base["class"]
    if base.get("name_or_path") and hasattr(transformers, cls):
        build = [f"from transformers import {cls}", "", f"model = {cls}.from_pretrained({base['name_or_path']!r})"]
    else:
        build = ["", f"model = ...  # the base model: a {cls}"]
    lines += ["", "## Usage", "", "```python", "import unipelt", *build, f"unipelt.load(model, {source!r})", "```",
              ""]
    if base.get("family_row"):
        lines += ["The base model's layers are described by the family row saved in `unipelt.json`; `unipelt.load` "
                  "uses it, no registration needed.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, metrics: dict[str, Any] | None = None,
                     repo_id: str | None = None) -> Path | None:
    """Write the model card as ``README.md`` in ``folder``, unless a README that unipelt did not write is there
    (kept as it is; returns ``None`` then)."""
    from .serialization import atomic_write_text

    path = Path(folder) / CARD_FILE
    if path.exists():
        try:
            own = CARD_MARKER in path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            own = False
        if not own:
            return None
    atomic_write_text(path, model_card(folder, metrics, repo_id))
    return path

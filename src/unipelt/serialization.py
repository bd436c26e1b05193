"""Save and load deltas: ``delta.safetensors`` + ``unipelt.json``, written atomically.

Each file is written to a temporary name in the target folder, flushed to disk and renamed over
the old one, the tensors first. ``unipelt.json`` records the SHA-256 of the tensor file, so a pair
left inconsistent by a kill between the two renames, or a corrupt file, is a clear error on load
rather than silently wrong weights. Other files in the folder are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import __version__, sharded
from .config import ConfigError, parse_config
from .core import (
    _remove_method,
    _start,
    add_method,
    attachment,
    base_parameter_count,
    deltas,
    detach,
    trainable_parameters,
)
from .families import FamilySpec, family_from_dict, family_to_dict, is_builtin

DELTA_FILE = "delta.safetensors"
META_FILE = "unipelt.json"
FORMAT = "unipelt-delta/1"

# Config entries that do not change the weights' meaning: left out of the base model's hash.
_VOLATILE = {
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_internal", "_attn_implementation_autoset", "id2label",
    "label2id", "use_cache", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "_experts_implementation", "output_router_logits",
    "quantization_config",  # a delta trained on a 4-/8-bit base (QLoRA) serves the full-precision base too
}


class DeltaFileError(ValueError):
    """A saved delta that is missing, corrupt, or made for another model."""


def config_hash(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):  # an nn.Module without a transformers config: its shapes
        data = {n: list(p.shape) for n, p in model.named_parameters() if not n.startswith("unipelt_deltas")}
    else:
        data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _fingerprint(model: nn.Module) -> float:
    """A cheap summary of the pretrained input embeddings, to warn about a different checkpoint."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else next(iter(model.children()), None)  # a plain nn.Module: its first part
    # ViT's input embeddings are a patch-embedding module without a ``weight`` of its own.
    w = getattr(emb, "weight", None) if emb is not None else None
    if not isinstance(w, torch.Tensor) and emb is not None:
        w = next(emb.parameters(), None)
    return float(sharded.whole(w.detach()).double().abs().mean()) if w is not None else 0.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: once, at import
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _give_mode(written: str | os.PathLike, path: Path) -> None:
    """Give the file ``written`` (to be renamed over ``path``) the mode ``open`` would give a new file, or the
    mode of the file it replaces. Temporary files (mkstemp's, and safetensors' own) are 0600, which would hide
    results and deltas from the other users of a shared folder."""
    os.chmod(written, (os.stat(path).st_mode & 0o7777) if path.exists() else 0o666 & ~_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it over ``path``: a reader sees the old
    file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _give_mode(tmp, path)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def delta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything ``save`` writes: each method's delta state and the trained head, by name, whole (under FSDP or
    ZeRO-3 gathered from every process: call it on all of them)."""
    state = attachment(model)
    parts = [(name, method.delta_state) for name, method in deltas(model).items()]
    if state.train_head:
        parts += [(f"head.{head_name}", head.state_dict) for head_name, head in state.model_map.head_modules.items()]
    tensors: dict[str, torch.Tensor] = {}
    for prefix, read in parts:
        # Under FSDP or ZeRO-3 a collective per part, copied before the parameters go back to their shards
        # (ZeRO-3 frees the gathered storage); per part because an FSDP2 module's state_dict shards its group
        # again, and whole() joins the DTensors it returns.
        with sharded.gathered(model):
            tensors.update({f"{prefix}.{k}": sharded.whole(v.detach()).to("cpu").contiguous().clone()
                            for k, v in read().items()})
    return tensors


def _model_type(model: nn.Module) -> str:
    """The config's ``model_type``; ``""`` for an ``nn.Module`` without a ``transformers`` config."""
    return getattr(getattr(model, "config", None), "model_type", None) or ""


def _save_meta(model: nn.Module, state: Any) -> dict[str, Any]:
    """``unipelt.json``'s content but the checksum: the methods' configs, the base model's identity, the counts."""
    methods = []
    for name, method in deltas(model).items():
        saved = method.saved_config() if hasattr(method, "saved_config") else method.config
        methods.append({"name": name, "config": saved.to_dict()})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "unipelt_version": __version__,
        "methods": methods,
        "train_head": state.train_head,
        "heads": sorted(state.model_map.head_modules) if state.train_head else [],
        "base_model": {
            "class": sharded.model_class(model).__name__,
            "model_type": _model_type(model),
            "family": state.model_map.family.name,
            "config_hash": config_hash(model),
            "embedding_fingerprint": _fingerprint(model),
            "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "parameters": base_parameter_count(model),
        },
        "trainable_parameters": trainable_parameters(model),
    }
    if not is_builtin(state.model_map.family):  # a row given at attach or registered: load needs it back
        meta["base_model"]["family_row"] = family_to_dict(state.model_map.family)
    return meta


def save(model: nn.Module, path: str | os.PathLike, *, push_to_hub: str | None = None,
         token: str | bool | None = None, private: bool | None = None, metrics: dict[str, Any] | None = None,
         model_card: bool | None = None, commit_message: str | None = None) -> Path:
    """Write only the delta (and trained task head) of ``model`` to folder ``path``.

    ``push_to_hub="user/repo"`` then uploads the folder's unipelt files to that Hub model repo (created when
    missing, ``private`` then; ``token`` as ``huggingface_hub`` takes it). A ``README.md`` model card (base model,
    methods and configs, trainable parameters, ``metrics`` or those of a ``results.json`` in the folder) is written
    when pushing, when ``metrics`` are given, or with ``model_card=True``; a README unipelt did not write is kept.

    Under FSDP or DeepSpeed ZeRO-3 call it on every process: each gathers the full deltas, rank 0 writes
    (:mod:`unipelt.sharded`).
    """
    state = attachment(model)
    if state is None or not deltas(model):
        raise ConfigError("nothing to save: no method is attached to this model (use unipelt.attach first)")
    folder = Path(path)
    # under FSDP or ZeRO-3 every process gathers the full deltas (collectives), and rank 0 writes
    tensors = delta_tensors(model)
    meta = _save_meta(model, state)
    if sharded.is_sharded(model) and not sharded.is_writer():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _commit_pair(folder, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}), meta)
    if (push_to_hub is not None or metrics is not None or model_card) and model_card is not False:
        from .hub import write_model_card

        write_model_card(folder, metrics, push_to_hub)
    if push_to_hub is not None:
        from .hub import push

        push(folder, push_to_hub, token=token, private=private, commit_message=commit_message)
    return folder


PENDING = ".new"  # suffix of a save's files while they are written; see _commit_pair


def _commit_pair(folder: Path, write_delta, meta: dict[str, Any]) -> None:
    """Replace the folder's delta and ``unipelt.json`` as one change, whatever stops the save.

    Both files are written in full beside the old pair (``*.new``, synced) before either is renamed over it: a
    full disk or a kill while writing leaves the previous delta untouched. The two renames come last, delta
    first; a kill between them leaves the new ``unipelt.json.new``, whose checksum names the new delta, and
    ``read_meta`` completes the change.
    """
    delta_new, meta_new = folder / (DELTA_FILE + PENDING), folder / (META_FILE + PENDING)
    try:
        write_delta(str(delta_new))
        _give_mode(delta_new, folder / DELTA_FILE)
        meta = {**meta, "delta_sha256": _sha256(delta_new)}
        meta_new.write_text(json.dumps(meta, indent=2) + "\n")
        _give_mode(meta_new, folder / META_FILE)
        for written in (delta_new, meta_new):
            with open(written, "rb") as f:
                os.fsync(f.fileno())
    except BaseException as error:
        delta_new.unlink(missing_ok=True)
        meta_new.unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = "the previous delta there is intact" if (folder / META_FILE).exists() else "nothing was saved"
            raise DeltaFileError(f"could not write the delta into {folder} ({error.strerror or error}); {kept}; "
                                 f"free space or choose another folder, then save again") from error
        raise
    os.replace(delta_new, folder / DELTA_FILE)
    os.replace(meta_new, folder / META_FILE)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_interrupted_save(folder: Path) -> None:
    """A save killed between its two renames (``_commit_pair``): the new delta is in place and its metadata waits
    as ``unipelt.json.new``, which names it by checksum: complete the change. Anything else left unfinished is
    ignored: the previous pair is intact."""
    meta_new, delta_new = folder / (META_FILE + PENDING), folder / (DELTA_FILE + PENDING)
    if meta_new.exists() and not delta_new.exists() and (folder / DELTA_FILE).exists():
        try:
            pending = json.loads(meta_new.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            pending = None
        if isinstance(pending, dict) and pending.get("delta_sha256") == _sha256(folder / DELTA_FILE):
            os.replace(meta_new, folder / META_FILE)
            return


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    _finish_interrupted_save(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise DeltaFileError(f"{folder} holds no {META_FILE}; is it a folder written by unipelt.save?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise DeltaFileError(f"{meta_path} is not valid JSON ({one_line(e)}); the file is corrupt: save the delta "
                             f"again") from e
    except OSError as e:  # a folder in its place, an unreadable file
        raise DeltaFileError(f"{meta_path} cannot be read ({e}); restore the folder written by unipelt.save") from e
    if not isinstance(meta, dict):
        raise DeltaFileError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; the file is corrupt")
    if meta.get("format") != FORMAT:
        raise DeltaFileError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    base, methods = meta.get("base_model"), meta.get("methods")
    if not (isinstance(base, dict) and all(k in base for k in ("class", "model_type", "config_hash"))
            and isinstance(methods, list) and methods
            and all(isinstance(m, dict) and "name" in m and isinstance(m.get("config"), dict) for m in methods)):
        raise DeltaFileError(f"{meta_path} lacks its base model or method entries; the file is corrupt: "
                             f"save the delta again")
    problem = _meta_problem(meta)
    if problem:
        raise DeltaFileError(f"{meta_path}: {problem}; the file is corrupt: save the delta again")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What in ``unipelt.json``'s entries has the wrong type (the checks above found them present), or None."""
    base, names = meta["base_model"], [m["name"] for m in meta["methods"]]
    if not all(isinstance(base[k], str) for k in ("class", "model_type", "config_hash")):
        return "base_model's class, model_type and config_hash must be strings"
    fingerprint = base.get("embedding_fingerprint", 0.0)
    if isinstance(fingerprint, bool) or not isinstance(fingerprint, (int, float)) or fingerprint != fingerprint:
        return f"base_model's embedding_fingerprint must be a number, got {fingerprint!r}"
    if not all(isinstance(n, str) and n and "." not in n for n in names) or len(set(map(str, names))) < len(names):
        return f"method names must be distinct non-empty strings without '.', got {names}"
    if not isinstance(meta.get("train_head", True), bool):
        return f"train_head must be true or false, got {meta['train_head']!r}"
    heads = meta.get("heads", [])
    if not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
        return f"heads must be a list of head names, got {heads!r}"
    if not isinstance(meta.get("delta_sha256"), str):
        return f"delta_sha256 must be the tensor file's checksum (a string), got {meta.get('delta_sha256')!r}"
    return None


def one_line(error: BaseException) -> str:
    """An error's message on one line (PyTorch's load_state_dict lists its problems on lines of their own)."""
    return " ".join(str(error).split())


def load_tasks(model: nn.Module, folders: dict[str, str | os.PathLike]) -> list[str]:
    """Serve several task deltas at once: load each folder's delta as task ``name`` (task id = its position).

    Call the model with ``task_ids`` (one id per row of the batch): each row's output is the one its
    task's delta gives alone. The deltas must leave the task head alone (``attach(..., train_head=False)``):
    the served model shares one head. Returns the task names in task-id order.
    """
    if not folders:
        raise ConfigError("load_tasks needs at least one {task name: delta folder}")
    for name, folder in folders.items():
        load(model, folder, task=name)
    return list(folders)


def load(model: nn.Module, path: str | os.PathLike, task: str | None = None, heads: bool = True, *,
         revision: str | None = None, token: str | bool | None = None, family: FamilySpec | None = None) -> nn.Module:
    """Attach the saved delta in ``path`` to ``model`` (a fresh base model) and fill its weights.

    With ``task``, the delta serves that task only: its methods are named ``<task>__<method>`` and act on
    the rows whose ``task_ids`` entry is this task's id (see :func:`load_tasks`). ``heads=False`` leaves
    the model's task head as it is (a new task's head, when a saved delta is the start of another task).
    Also reads a LoRA folder saved by ``peft`` (``adapter_config.json``). ``path`` may be a Hub repo id
    (``"user/repo"``, at ``revision``, with ``token``) where no such local folder exists: fetched through
    ``huggingface_hub.snapshot_download``, its cache first. A delta saved for a family the table does not have
    carries its row, which resolves the model; ``family`` gives another row.
    """
    from .hub import resolve_source

    folder = resolve_source(path, revision, token)
    if not (folder / META_FILE).exists() and (folder / "adapter_config.json").exists():
        from .peft_format import load_peft

        return load_peft(model, folder)
    meta = read_meta(folder)
    base = meta["base_model"]
    if base["config_hash"] != config_hash(model) or base["class"] != type(model).__name__:
        raise DeltaFileError(
            f"{folder} was saved for {base['class']} ({base['model_type']}, config {base['config_hash']}), "
            f"but this model is {type(model).__name__} ({_model_type(model)}, config {config_hash(model)}); "
            f"load it into the model it was trained on"
        )
    if abs(base.get("embedding_fingerprint", 0.0) - _fingerprint(model)) > 1e-6 * max(1.0, _fingerprint(model)):
        warnings.warn(f"{folder}: the base model's embeddings differ from the ones the delta was trained on "
                      f"(same architecture, other checkpoint?)", UserWarning, stacklevel=2)
    delta_path = folder / DELTA_FILE
    if not delta_path.is_file():
        where = " (a folder is in its place)" if delta_path.exists() else ""
        raise DeltaFileError(f"{delta_path} is missing{where}")
    if _sha256(delta_path) != meta.get("delta_sha256"):
        raise DeltaFileError(f"{delta_path} does not match {META_FILE} (corrupt, or a save was interrupted); "
                             f"save the delta again or restore both files together")
    try:
        tensors = load_file(str(delta_path))
    except Exception as e:  # safetensors raises its own error types
        raise DeltaFileError(f"{delta_path} cannot be read ({one_line(e)}); the file is corrupt") from e
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise DeltaFileError(f"{delta_path} holds NaN or infinite values in {non_finite[:3]}; the delta is corrupt "
                             f"(or its training diverged): save a good one again")
    fresh = attachment(model) is None
    state = attachment(model) or _start(model, meta.get("train_head", True) if task is None else False,
                                        family or _saved_family(base, folder))
    try:
        task_id = _task_id(state, task, meta, folder) if task is not None else None
    except Exception:
        if fresh:
            detach(model)
        raise
    added = []
    # a failed load into a model with deltas of its own puts back what a partial head load overwrote
    head_backup = {} if fresh else {n: {k: v.detach().clone() for k, v in h.state_dict().items()}
                                    for n, h in state.model_map.head_modules.items()}
    try:
        for entry in meta["methods"]:
            name = add_method(model, parse_config(entry["config"]),
                              name=entry["name"] if task is None else f"{task}__{entry['name']}")
            added.append(name)
            if task_id is not None:
                state.method_task[name] = task_id
            prefix = f"{entry['name']}."  # tensors are stored under the saved name
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                deltas(model)[name].load_delta_state(own)
            except (ConfigError, RuntimeError) as e:  # missing, unexpected or mis-shaped tensors
                raise DeltaFileError(f"{delta_path}: the tensors of '{name}' do not fit its config in {META_FILE} "
                                     f"({one_line(e)}); the two files do not belong together") from e
        with torch.no_grad():
            for head_name in meta.get("heads", []) if heads else []:
                head = state.model_map.head_modules.get(head_name)
                prefix = f"head.{head_name}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if head is None:
                    raise DeltaFileError(f"{folder} has a trained head '{head_name}' this model lacks")
                try:
                    head.load_state_dict(own)
                except RuntimeError as e:
                    raise DeltaFileError(f"{folder}: the saved head '{head_name}' does not fit ({one_line(e)}); "
                                         f"was it trained with another number of labels?") from e
    except Exception:
        # the methods attached before this load (other tasks', or the user's own) stay, with their heads' weights
        for name in added:
            _remove_method(model, name)
        if task is not None:
            state.tasks.pop(task, None)  # registered last by _task_id; the earlier tasks keep their ids
        if fresh or not deltas(model):
            detach(model)
        else:
            _restore_heads(state, head_backup)
        raise
    return model


@torch.no_grad()
def _restore_heads(state: Any, backup: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, saved in backup.items():
        state.model_map.head_modules[name].load_state_dict(saved)


def _saved_family(base: dict[str, Any], folder: Path) -> FamilySpec | None:
    """The family row a delta was saved with, where the table does not have it (``None``: the table's)."""
    row = base.get("family_row")
    if row is None:
        return None
    try:
        return family_from_dict(row)
    except ConfigError as e:
        raise DeltaFileError(f"{folder / META_FILE}: its family row is damaged ({e}); save the delta again, or pass "
                             f"the row as load(..., family=row)") from e


def _task_id(state: Any, task: str, meta: dict[str, Any], folder: Path) -> int:
    """Register ``task`` for serving (after checking its delta can share the model); its id."""
    if not task or "." in task or "__" in task:
        raise ConfigError(f"task name {task!r}: use a non-empty name without '.' or '__'")
    if task in state.tasks:
        raise ConfigError(f"task {task!r} is already served; give each delta its own task name")
    if meta.get("heads"):
        raise DeltaFileError(f"{folder} carries a trained task head ({', '.join(meta['heads'])}); served tasks share "
                             f"the model's head: train them with attach(..., train_head=False), or serve this "
                             f"delta alone with unipelt.load")
    unsupported = sorted({m["config"]["method"] for m in meta["methods"]} - set(_row_aware_methods()))
    if unsupported:
        raise ConfigError(f"{folder}: {unsupported} cannot serve one task among others in a batch yet; "
                          f"methods that can: {sorted(_row_aware_methods())}")
    prompts = [(m["config"].get("length"), m["config"].get("position")) for m in meta["methods"]
               if m["config"]["method"] == "prompt"]
    if prompts:
        model = state.model_map.model
        if getattr(model.config, "is_encoder_decoder", False) or state.model_map.family.name == "vit":
            raise ConfigError(f"{folder}: prompt deltas serve several tasks in one batch on encoder-only and "
                              f"decoder-only text models; serve this {model.config.model_type} delta alone")
        if len(prompts) > 1:
            raise ConfigError(f"{folder} holds {len(prompts)} prompts; a served task may have one")
        from .methods.prompt import joins_after_embeddings

        if any(joins_after_embeddings(m["config"].get("join", "input"), state.model_map) for m in meta["methods"]
               if m["config"]["method"] == "prompt"):
            raise ConfigError(f"{folder}: a prompt joined after the embeddings (join='embeddings') is served alone; "
                              f"serve tasks together with prompts of join='input'")
    # the tasks' prompts share one insertion: either every served task has a prompt of one length and position,
    # or none has
    signature = prompts[0] if prompts else None
    others = set(state.tasks.values())
    if others and others != {signature}:
        raise ConfigError(f"{folder}: task {task!r} has prompt {signature or 'none'} (length, position), but the "
                          f"served tasks have {sorted(map(str, others))}; tasks served together need prompts of "
                          f"one length and position, or none")
    state.tasks[task] = signature
    return len(state.tasks) - 1


def _row_aware_methods() -> list[str]:
    """Methods whose hooks honour per-row task masks (``serves_rows``)."""
    from .methods import METHOD_CLASSES

    return [name for name, cls in METHOD_CLASSES.items() if getattr(cls, "serves_rows", False)]

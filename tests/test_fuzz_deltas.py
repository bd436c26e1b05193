"""Fuzzing ``unipelt.load`` with damaged delta folders.

Folders saved by ``unipelt.save`` (and ``unipelt.export_peft``) from a few methods on tiny models are damaged:
``delta.safetensors`` truncated, bit-flipped, emptied, replaced, or rewritten with tensors missing, extra,
renamed, of other shapes or dtypes (then rehashed, so the checksum passes and the damage reaches the parser);
``unipelt.json`` with keys missing, extra or of the wrong type, configs changed, bad JSON or UTF-8; files
missing or folders in their place; ``adapter_config.json`` of peft folders likewise. Loading each into a fresh
model, or into one that already has a delta attached, either works (the model then runs) or raises one of the
library's errors with a one-line message, and then the model is exactly as before: no attachment added or
removed, the same outputs. Any other exception is a bug.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import unipelt
from conftest import inputs, perturb_
from fuzz_support import LIBRARY_ERRORS, check_message, examples, fresh, record, untouched

SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# (family, config) of the saved deltas: one method, several methods with gates, a prompt, a trained head
SOURCES = {
    "bert-houlsby": ("bert", {"method": "houlsby", "bottleneck": 8}),
    "bert-unipelt": ("bert", {"method": "unipelt", "adapter": {"bottleneck": 8}, "prefix": {"length": 3},
                              "lora": {"r": 2}}),
    "llama-lora": ("llama", {"method": "lora", "r": 2, "targets": ["q", "v", "o"]}),
    "gpt2-prompt": ("gpt2", {"method": "prompt", "length": 3}),
    "t5-composition": ("t5", {"method": "composition", "methods": [{"method": "ia3"}, {"method": "ln"}]}),
}
PEFT_SOURCES = {"bert-peft-lora": ("bert", {"method": "lora", "r": 2})}
DELTA, META, PEFT_CONFIG, PEFT_WEIGHTS = "delta.safetensors", "unipelt.json", "adapter_config.json", \
    "adapter_model.safetensors"


def _outputs(model: torch.nn.Module, family: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs(family)).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, dict[str, bytes]]]:
    """Each source's folder as its files' bytes (deltas perturbed off their zero start, so loads matter)."""
    out = {}
    for key, (family, config) in {**SOURCES, **PEFT_SOURCES}.items():
        model = unipelt.attach(fresh(family), copy.deepcopy(config))
        perturb_([p for p in model.parameters() if p.requires_grad], seed=5, scale=0.05)
        folder = tmp_path_factory.mktemp(key)
        if key in PEFT_SOURCES:
            unipelt.export_peft(model, folder)
        else:
            unipelt.save(model, folder)
        out[key] = (family, {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()})
    return out


# ----------------------------------------------------------------------------------------------- mutations


def _rehash(files: dict[str, Any]) -> None:
    """Make unipelt.json's checksum match the (damaged) tensor file, so loading gets past it."""
    if not isinstance(files.get(META), bytes) or not isinstance(files.get(DELTA), bytes):
        return
    try:
        meta = json.loads(files[META])
    except (ValueError, RecursionError):  # damaged beyond parsing
        return
    if isinstance(meta, dict):
        meta["delta_sha256"] = hashlib.sha256(files[DELTA]).hexdigest()
        files[META] = json.dumps(meta).encode()


def _tensors_edit(data: bytes, how: str, draw) -> bytes:
    """The tensor file with one tensor changed: removed, added, renamed, reshaped, retyped, made NaN."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        path.write_bytes(data)
        try:
            tensors = load_file(str(path))
        except Exception:  # damaged already (garbage, truncated): nothing to edit
            return data
        if not tensors:
            return data
        names = sorted(tensors)
        name = draw(st.sampled_from(names))
        t = tensors[name]
        if how == "remove":
            del tensors[name]
        elif how == "add":
            tensors[draw(st.sampled_from(["extra.weight", f"{name}_2", "head.classifier.extra", name + ".x"]))] = \
                torch.zeros(2)
        elif how == "rename":
            tensors[name.replace(".", "_", 1) + "_renamed"] = tensors.pop(name)
        elif how == "reshape":
            tensors[name] = draw(st.sampled_from([torch.zeros(t.numel() + 1), torch.zeros(*t.shape, 2),
                                                  torch.zeros(()), t.reshape(-1)[:0],
                                                  t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)]))
        elif how == "retype":
            tensors[name] = t.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                                       torch.float64, torch.uint8])))
        elif how == "nan":
            tensors[name] = torch.full_like(t, float("nan")) if t.is_floating_point() else t
        save_file(tensors, str(path), metadata=draw(st.sampled_from([{"format": "unipelt-delta/1"}, None,
                                                                      {"format": "pt"}])))
        return path.read_bytes()


WRONG_JSON = [None, 0, -1, 1.5, True, "", "x", [], [1], {}, {"a": 1}, float("nan")]


def _json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (dicts and lists)."""
    paths = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        paths.append((*prefix, k))
        paths.extend(_json_paths(v, (*prefix, k)))
    return paths


@st.composite
def json_edit(draw, data: bytes) -> bytes:
    """A JSON file with one key removed, one value replaced (wrong type, or another valid-looking value),
    a key added, or the text damaged."""
    how = draw(st.sampled_from(["delete", "replace", "replace", "add", "text"]))
    if how == "text":
        return draw(st.sampled_from([b"", b"{", b"[1, 2]", b"null", b"\xff\xfe{}", data[: len(data) // 2],
                                     data.replace(b"{", b"[", 1), b'{"format": NaN}', b"[" * 50_000]))
    doc = json.loads(data)
    paths = _json_paths(doc)
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if how == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    elif how == "replace":
        old = parent[last]
        values = list(WRONG_JSON)
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            values += [0, -old, old * 4, old + 1, 10 ** 12]
        if isinstance(old, str):
            values += [old.upper(), old + "_", "lora", "prompt", "bert", "../x"]
        parent[last] = draw(st.sampled_from(values))
    else:
        target = parent[last] if isinstance(parent[last], dict) else parent
        if isinstance(target, dict):
            target[draw(st.sampled_from(["extra", "bogus_key", "r", "gate", "heads"]))] = draw(
                st.sampled_from(WRONG_JSON + ["classifier"]))
    return json.dumps(doc).encode()


@st.composite
def damaged_folder(draw, files: dict[str, bytes], peft: bool) -> tuple[dict[str, Any], str]:
    """``files`` with one or two kinds of damage; a folder (``None``) where a file was, a missing file."""
    files = dict(files)
    weights, config = (PEFT_WEIGHTS, PEFT_CONFIG) if peft else (DELTA, META)
    kinds = draw(st.lists(st.sampled_from(["truncate", "flip", "empty", "garbage", "tensors", "json", "json",
                                           "missing", "folder", "rehash", "none"]),
                          min_size=1, max_size=2, unique=True))
    for kind in kinds:
        target = draw(st.sampled_from([weights, config]))
        if kind in ("truncate", "flip", "tensors") and not files.get(weights):  # missing, a folder, emptied
            continue
        data = files.get(weights)
        if kind == "truncate":
            files[weights] = data[:draw(st.integers(0, len(data) - 1))]
        elif kind == "flip":
            at = draw(st.integers(0, len(data) - 1))
            files[weights] = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
        elif kind == "empty":
            files[weights] = b""
        elif kind == "garbage":
            files[weights] = draw(st.sampled_from([b"\x00" * 64, b"\xff" * 9, (2 ** 62).to_bytes(8, "little") + b"{}",
                                                   (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}  ']))
        elif kind == "tensors" and isinstance(data, bytes):
            how = draw(st.sampled_from(["remove", "add", "rename", "reshape", "retype", "nan"]))
            files[weights] = _tensors_edit(data, how, draw)
        elif kind == "json" and isinstance(files.get(config), bytes):
            files[config] = draw(json_edit(files[config]))
        elif kind == "missing":
            files.pop(target, None)
        elif kind == "folder":
            files[target] = None
    if "rehash" in kinds or draw(st.booleans()):
        _rehash(files)
    return files, "+".join(kinds)


# ----------------------------------------------------------------------------------------------------- check


def _write(folder: Path, files: dict[str, Any]) -> None:
    for name, data in files.items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)


def run_delta_case(family: str, files: dict[str, Any], pre_attached: bool) -> str:
    model = fresh(family)
    if pre_attached:  # a delta of its own, trained: a failed load must keep it
        unipelt.attach(model, {"method": "ln"})
        perturb_([p for p in model.parameters() if p.requires_grad], seed=9, scale=0.05)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _outputs(model, family)
    before_names = sorted(unipelt.core.deltas(model))
    with tempfile.TemporaryDirectory(prefix="unipelt-fuzz-delta-") as tmp:
        folder = Path(tmp)
        _write(folder, files)
        try:
            unipelt.load(model, folder)
        except LIBRARY_ERRORS as e:
            check_message(e)
            assert sorted(unipelt.core.deltas(model)) == before_names, \
                f"a failed load changed the attached deltas: {before_names} -> {sorted(unipelt.core.deltas(model))}"
            assert pre_attached or untouched(model), f"a failed load left an attachment: {e}"
            after = model.state_dict()
            assert after.keys() == before_state.keys() and all(torch.equal(after[k], v)
                                                               for k, v in before_state.items()), \
                f"a failed load changed the model's weights: {e}"
            assert torch.equal(_outputs(model, family), before), f"a failed load changed the outputs: {e}"
            return type(e).__name__
    # loaded: the model runs (a delta whose damage left it loadable, say an extra key in unipelt.json)
    assert torch.isfinite(_outputs(model, family)).all(), "a loaded delta gives non-finite outputs"
    return "loaded"


@settings(SETTINGS, max_examples=examples(400))
@given(data=st.data())
def test_fuzzed_delta_folders(saved, data) -> None:
    key = data.draw(st.sampled_from(sorted({**SOURCES, **PEFT_SOURCES})), label="source")
    family, files = saved[key]
    damaged, kinds = data.draw(damaged_folder(files, key in PEFT_SOURCES), label="damage")
    pre_attached = data.draw(st.sampled_from(range(4)), label="pre-attached") == 1
    outcome = run_delta_case(family, damaged, pre_attached)
    record("deltas", outcome)


def test_undamaged_folders_load(saved) -> None:
    """The fuzz's sources load as saved (so what the damage breaks is the damage's doing)."""
    for family, files in saved.values():
        assert run_delta_case(family, files, pre_attached=False) == "loaded"


def test_missing_or_odd_folders(saved, tmp_path: Path) -> None:
    """No folder, a file where the folder should be, an empty folder."""
    model = fresh("bert")
    for path in (tmp_path / "nothing", tmp_path / "file", tmp_path / "empty"):
        if path.name == "file":
            path.write_text("x")
        elif path.name == "empty":
            path.mkdir()
        with pytest.raises(LIBRARY_ERRORS) as err:
            unipelt.load(model, path)
        check_message(err.value)
        assert untouched(model)
    shutil.rmtree(tmp_path / "empty")


def _edit_meta(files: dict[str, Any], edit) -> dict[str, Any]:
    files = dict(files)
    meta = json.loads(files[META])
    edit(meta)
    files[META] = json.dumps(meta).encode()
    return files


def _edit_tensor(files: dict[str, Any], change) -> dict[str, Any]:
    """The first delta tensor replaced by ``change(tensor)``, the checksum updated."""
    files = dict(files)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DELTA
        path.write_bytes(files[DELTA])
        tensors = load_file(str(path))
        name = sorted(k for k in tensors if not k.startswith("head."))[0]
        tensors[name] = change(tensors[name])
        save_file(tensors, str(path), metadata={"format": "unipelt-delta/1"})
        files[DELTA] = path.read_bytes()
    _rehash(files)
    return files


def _peft_config(files: dict[str, Any], edit) -> dict[str, Any]:
    files = dict(files)
    files[PEFT_CONFIG] = json.dumps(edit(json.loads(files[PEFT_CONFIG]))).encode()
    return files


# The distinct failures the fuzz found: (source, damage, pre-attached). Before its fix each load raised the
# exception in the comment, or did what it says; now each is a library error and the model is as before.
FUZZ_FINDS = {
    "meta_folder": ("bert-houlsby", lambda f: {**f, META: None}, False),  # IsADirectoryError
    "delta_folder": ("bert-unipelt", lambda f: {**f, DELTA: None}, False),  # IsADirectoryError
    "meta_nested": ("t5-composition", lambda f: {**f, META: b"[" * 50_000}, False),  # RecursionError
    "name_float": ("t5-composition", lambda f: _edit_meta(f, lambda m: m["methods"][0].update(name=1.5)),
                   False),  # TypeError: module name should be a string
    "name_path": ("t5-composition", lambda f: _edit_meta(f, lambda m: m["methods"][1].update(name="../x")),
                  True),  # KeyError: module name can't contain "."
    "heads_list": ("bert-unipelt", lambda f: _edit_meta(f, lambda m: m.update(heads=[["classifier"]])),
                   False),  # TypeError: unhashable type: 'list'
    "fingerprint_str": ("bert-houlsby", lambda f: _edit_meta(
        f, lambda m: m["base_model"].update(embedding_fingerprint="x")), False),  # TypeError: str - float
    "wrong_shape": ("llama-lora", lambda f: _edit_tensor(f, lambda t: torch.zeros(t.numel() + 1)),
                    False),  # DeltaFileError, but its message spanned lines (load_state_dict's own)
    "nan_tensor": ("bert-houlsby", lambda f: _edit_tensor(f, lambda t: torch.full_like(t, float("nan"))),
                   False),  # loaded: NaN outputs
    # detached the user's own delta (and changed the outputs) along with the failed load's
    "pre_attached": ("bert-houlsby", lambda f: _edit_tensor(f, lambda t: torch.zeros(t.numel() + 1)), True),
    "peft_list": ("bert-peft-lora", lambda f: {**f, PEFT_CONFIG: b"[1, 2]"}, False),  # AttributeError: .get
    "peft_no_r": ("bert-peft-lora", lambda f: _peft_config(f, lambda c: {k: v for k, v in c.items() if k != "r"}),
                  True),  # KeyError: 'r'
    "peft_r_list": ("bert-peft-lora", lambda f: _peft_config(f, lambda c: {**c, "r": []}), False),  # TypeError
    "peft_no_targets": ("bert-peft-lora", lambda f: _peft_config(
        f, lambda c: {k: v for k, v in c.items() if k != "target_modules"}), True),  # KeyError: 'target_modules'
    "peft_nested": ("bert-peft-lora", lambda f: {**f, PEFT_CONFIG: b"[" * 50_000}, False),  # RecursionError
    "peft_pre_attached": ("bert-peft-lora", lambda f: {**f, PEFT_WEIGHTS: b""}, True),  # detached the user's delta
}


@pytest.mark.parametrize("case", sorted(FUZZ_FINDS))
def test_fuzz_finds_stay_fixed(saved, case: str) -> None:
    key, damage, pre_attached = FUZZ_FINDS[case]
    family, files = saved[key]
    assert run_delta_case(family, damage(files), pre_attached) in ("DeltaFileError", "ConfigError")

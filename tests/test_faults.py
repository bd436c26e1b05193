"""Faults during work lose nothing: a run killed anywhere resumes to the same delta, a full disk keeps the previous
delta, two runs on one folder refuse each other, and no checkpoint can run code when it is read.

The longer randomised loop (SIGKILL at random times, resumed until done) is ``benchmarks/kill_resume.py``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import unipelt
from conftest import build, inputs, logits
from test_cli import needs_glue, small_glue, tiny_model, train_args  # noqa: F401  (fixtures)
from unipelt import serialization
from unipelt.cli import EXIT_BAD_INPUT, main
from unipelt.config import ConfigError
from unipelt.train import loop

SRC = Path(__file__).resolve().parents[1] / "src" / "unipelt"
ARGS = ("--max-steps", "8", "--eval-every", "2", "--patience", "100")


# ------------------------------------------------------------------- checkpoints never run code


class _Payload:
    """Unpickling this runs ``exec``: what a crafted checkpoint in a shared run folder would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _plant(path: Path, marker: Path, how: str) -> None:
    payload = {"format": loop.CHECKPOINT_FORMAT, "config": {"task": "sst2", "method": "lora"}, "x": _Payload(marker)}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_planted_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    _plant(tmp_path / "checkpoint.pt", marker, how)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="cannot be read safely.*without --resume"):
        loop.read_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists(), "reading the checkpoint executed its payload"


@needs_glue
def test_resume_from_a_planted_checkpoint_exits_2_without_running_it(tiny_model, small_glue, tmp_path,  # noqa: F811
                                                                      capsys) -> None:
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    _plant(out / "checkpoint.pt", marker, "torch")
    assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", "--resume")) == EXIT_BAD_INPUT
    assert "cannot be read safely" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_of_an_older_format_is_refused(tmp_path: Path) -> None:
    torch.save({"config": {"task": "sst2", "method": "lora"}, "weights": {}}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="format 2.*older unipelt"):
        loop.read_checkpoint(tmp_path / "old.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ConfigError, match="damaged"):
        loop.read_checkpoint(tmp_path / "torn.pt")


def test_the_library_unpickles_nothing() -> None:
    """Every ``torch.load`` in the package passes ``weights_only=True``; no ``pickle.load``, no pickled numpy."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            line = text[call.start():text.index(")", call.start()) + 1]
            assert "weights_only=True" in line, f"{path}: {line}"
        assert not re.search(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False", text), path


# ------------------------------------------------------------------------ killed runs resume exactly


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, small_glue, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS)) == 0
    return out


def _same_run(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["score"] == rb["score"] and ra["validation"]["history"] == rb["validation"]["history"]


def _readable(out: Path) -> None:
    """What a kill leaves: no half-written file under a real name, a checkpoint (if any) that reads."""
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.new"))
    if (out / "checkpoint.pt").exists():
        loop.read_checkpoint(out / "checkpoint.pt")


class Killed(BaseException):
    """Stands for SIGKILL/Ctrl-C: not an Exception, so nothing in the library may swallow it."""


def _kill_in_training_step(monkeypatch, at: int) -> None:
    real, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _kill_in_validation(monkeypatch, at: int) -> None:
    real, calls = torch.nn.Module.__call__, []

    def call(self, *args, **kwargs):
        if type(self).__name__ == "BertForSequenceClassification" and not self.training:
            calls.append(1)
            if len(calls) == at:
                raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", call)


def _kill_in_checkpoint_write(monkeypatch, at: int) -> None:
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            Path(f).write_bytes(b"half a checkpoint")
            raise Killed
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _kill_in_delta_save(monkeypatch, at: int) -> None:
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a delta")
        raise Killed

    monkeypatch.setattr(serialization, "save_file", save_file)


def _kill_between_renames(monkeypatch, at: int) -> None:
    real = serialization.os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name == serialization.DELTA_FILE:
            raise Killed  # the new delta is in place, its unipelt.json still pending

    monkeypatch.setattr(serialization.os, "replace", replace)


KILLS = {
    "training step 3": (_kill_in_training_step, 3),
    "training step 6": (_kill_in_training_step, 6),
    "second validation": (_kill_in_validation, 2),
    "third checkpoint write": (_kill_in_checkpoint_write, 3),
    "delta save": (_kill_in_delta_save, 1),
    "between the delta's renames": (_kill_between_renames, 1),
}


@needs_glue
@pytest.mark.parametrize("where", list(KILLS))
def test_killed_anywhere_resumes_to_the_same_delta(where, uninterrupted, tiny_model, small_glue,  # noqa: F811
                                                     tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    inject, at = KILLS[where]
    with monkeypatch.context() as patch:
        inject(patch, at)
        with pytest.raises(Killed):
            main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS))
    if where == "between the delta's renames":  # the save completed but for its metadata's rename
        assert (out / "unipelt.json.new").exists()
        unipelt.load(build_sst2_like(tiny_model), out)  # reading completes the change
        assert not (out / "unipelt.json.new").exists()
    _readable(out)
    assert not (out / "results.json").exists()
    assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS, "--resume")) == 0
    _same_run(uninterrupted, out)


def build_sst2_like(model_path: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


# ---------------------------------------------------------------------------------------- full disk


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_save_keeps_the_previous_delta(tmp_path: Path, monkeypatch) -> None:
    model = unipelt.attach(build("bert"), "lora")
    with torch.no_grad():
        for p in model.unipelt_deltas.parameters():
            p.add_(0.1)
    unipelt.save(model, tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    batch = inputs("bert")
    expected = logits(model, batch)
    with torch.no_grad():
        for p in model.unipelt_deltas.parameters():
            p.add_(0.5)
    monkeypatch.setattr(serialization, "save_file", _full_disk)
    with pytest.raises(unipelt.DeltaFileError, match="No space left.*previous delta there is intact"):
        unipelt.save(model, tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    fresh = unipelt.load(build("bert"), tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=0, rtol=0)
    with pytest.raises(unipelt.DeltaFileError, match="nothing was saved"):
        unipelt.save(model, tmp_path / "new")
    assert not any((tmp_path / "new").iterdir())


def _current_umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_saved_files_get_the_mode_open_gives_and_a_replaced_file_keeps_its_own(tmp_path: Path) -> None:
    import stat

    model = unipelt.attach(build("bert"), "lora")
    unipelt.save(model, tmp_path / "a")
    expected = 0o666 & ~serialization._UMASK
    assert expected == 0o666 & ~_current_umask()
    files = [f for f in (tmp_path / "a").iterdir() if f.is_file()]
    assert files and {stat.S_IMODE(f.stat().st_mode) for f in files} == {expected}  # not mkstemp's 0600
    for f in files:
        f.chmod(0o640)
    unipelt.save(model, tmp_path / "a")
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o640}
    serialization.atomic_write_text(tmp_path / "note.txt", "x")
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == expected


@needs_glue
def test_full_disk_at_the_end_of_a_run_says_so_and_resumes(uninterrupted, tiny_model, small_glue, tmp_path,  # noqa: F811
                                                          monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(serialization, "save_file", _full_disk)
        assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "No space left" in err and len(err.splitlines()) == 1
    _readable(out)
    assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS, "--resume")) == 0
    _same_run(uninterrupted, out)


# ------------------------------------------------------------------------------- one run per folder


@needs_glue
def test_a_second_run_on_the_same_folder_refuses(tiny_model, small_glue, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    with open(out / loop.LOCK_FILE, "a+") as held:  # the first run, still writing
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS)) == EXIT_BAD_INPUT
        assert "another unipelt run is writing into" in capsys.readouterr().err
        assert sorted(f.name for f in out.iterdir()) == [loop.LOCK_FILE]
        fcntl.flock(held, fcntl.LOCK_UN)
    assert main(train_args(tiny_model, small_glue, out, "sst2", "lora", *ARGS)) == 0


def test_a_second_sweep_on_the_same_folder_refuses(tmp_path: Path) -> None:
    from unipelt.sweep import load_spec, run_sweep

    spec = load_spec({"tasks": ["sst2"], "methods": {"lora": {}}, "seeds": [1], "settings": {"k16": {"k_shot": 16}}})
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / loop.LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another unipelt sweep is writing into"):
            run_sweep(spec, out, device="cpu", log=lambda line: None)
    assert not (out / "spec.json").exists()

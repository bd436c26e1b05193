"""Deltas on the Hugging Face Hub: ``save(..., push_to_hub=...)`` and ``load(model, "user/repo")``.

No network: the push goes through ``huggingface_hub.HfApi``, whose ``create_repo`` and ``upload_folder`` are replaced
by recorders (what they are called with is what the Hub would receive). The pull reads a snapshot laid out as the
Hub's cache lays it out (``models--user--repo/snapshots/<sha>/`` and ``refs/main``), in a fresh interpreter with
``HF_HUB_CACHE`` pointing at it and ``HF_HUB_OFFLINE=1``: ``snapshot_download`` resolves it from the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch

import unipelt
from conftest import build, inputs, logits, perturb_

SHA = "0123456789abcdef0123456789abcdef01234567"


def trained(name: str = "bert", config=None) -> torch.nn.Module:
    model = unipelt.attach(build(name), config or {"method": "lora", "r": 2, "targets": ["q", "v"]})
    perturb_(model.unipelt_deltas.parameters(), seed=5, scale=0.2)
    return model


@pytest.fixture
def hub(monkeypatch) -> list[tuple[str, dict]]:
    """Record HfApi's create_repo and upload_folder calls (with the files the upload would send)."""
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        sent = sorted(p.name for p in Path(folder_path).iterdir() if p.name in kw.get("allow_patterns", []))
        calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, "sent": sent,
                                        "card": (Path(folder_path) / "README.md").read_text(), **kw}))
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_writes_the_card_and_uploads_the_delta(tmp_path: Path, hub) -> None:
    model = trained()
    model.config._name_or_path = "google-bert/bert-base-uncased"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_text("not sent")  # other files of the folder stay local
    folder = unipelt.save(model, tmp_path / "out", push_to_hub="alice/bert-lora", private=True, token="hf_x",
                          metrics={"accuracy": 0.8125, "f1": 0.79})
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]
    created, uploaded = hub[0][1], hub[1][1]
    assert created == {"repo_id": "alice/bert-lora", "private": True, "exist_ok": True, "repo_type": "model"}
    assert uploaded["repo_id"] == "alice/bert-lora" and Path(uploaded["folder_path"]) == folder
    assert uploaded["sent"] == ["README.md", "delta.safetensors", "unipelt.json"]
    card = uploaded["card"]
    assert card.startswith("---\nlibrary_name: unipelt\n") and 'base_model: "google-bert/bert-base-uncased"' in card
    assert "# alice/bert-lora" in card and '"method": "lora"' in card and '"targets": [' in card
    trainable = unipelt.trainable_parameters(model)
    assert f"| lora | {trainable['lora']:,} |" in card and f"| head | {trainable['head']:,} |" in card
    assert "| accuracy | 0.8125 |" in card and "| f1 | 0.79 |" in card
    assert "unipelt.load(model, 'alice/bert-lora')" in card and "BertForSequenceClassification.from_pretrained" in card
    # the card sits in the folder too, and loading the folder ignores it
    fresh = unipelt.load(build("bert"), folder)
    assert torch.allclose(logits(fresh, inputs("bert")), logits(model, inputs("bert")), atol=1e-6)


def test_card_reads_results_json_and_keeps_a_users_readme(tmp_path: Path, hub) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"task": "sst2", "main_metric": "accuracy", "score": 91.5,
                                                     "metrics": {"accuracy": 91.5}}))
    unipelt.save(trained(), folder, push_to_hub="alice/run")
    assert hub[1][1]["sent"] == ["README.md", "delta.safetensors", "results.json", "unipelt.json"]
    card = (folder / "README.md").read_text()
    assert "| accuracy | 91.5 |" in card and "| task | sst2 |" in card
    (folder / "README.md").write_text("# my own card\n")
    unipelt.save(trained(), folder, push_to_hub="alice/run")
    assert (folder / "README.md").read_text() == "# my own card\n"
    plain = unipelt.save(trained(), tmp_path / "plain")  # no push, no metrics: no card, as before
    assert not (plain / "README.md").exists()


def test_push_errors_are_one_line(tmp_path: Path, hub, monkeypatch) -> None:
    with pytest.raises(unipelt.DeltaFileError, match="no Hub repo id"):
        unipelt.save(trained(), tmp_path / "a", push_to_hub="not a repo")

    def refuse(self, **kw):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    with pytest.raises(unipelt.DeltaFileError, match="could not push .* 'alice/x'.*401.*push_to_hub") as err:
        unipelt.save(trained(), tmp_path / "b", push_to_hub="alice/x")
    assert "\n" not in str(err.value) and (tmp_path / "b" / "delta.safetensors").exists()
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw["allow_patterns"]))
    unipelt.push_to_hub(tmp_path / "b", "alice/x")  # push a saved folder again
    assert calls == ["alice/x", ["unipelt.json", "delta.safetensors", "README.md"]]


def cache_snapshot(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder``'s files out as the Hub cache keeps a downloaded snapshot of ``repo_id`` at ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def test_load_from_a_cached_hub_snapshot_offline(tmp_path: Path) -> None:
    model = trained("llama", {"method": "composition", "methods": [{"method": "lora", "r": 2,
                                                                    "targets": ["all-linear"], "layers": [1]}, "ia3"]})
    folder = unipelt.save(model, tmp_path / "delta", model_card=True)
    cache_snapshot(tmp_path / "cache", "alice/llama-delta", folder)
    torch.save(logits(model, inputs("llama")), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import unipelt
        from conftest import build, inputs, logits
        model = unipelt.load(build("llama"), "alice/llama-delta")
        assert torch.allclose(logits(model, inputs("llama")), torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6)
        unipelt.load(build("llama"), "alice/llama-delta", revision={SHA!r})  # a commit: no ref needed
        try:
            unipelt.load(build("llama"), "alice/not-cached")
        except unipelt.DeltaFileError as e:
            assert "'alice/not-cached' is no local folder" in str(e) and "\\n" not in str(e), e
        else:
            raise AssertionError("loaded a repo that is not in the cache")
        print("ok")
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_local_folders_win_and_revision_needs_a_repo(tmp_path: Path, monkeypatch) -> None:
    folder = unipelt.save(trained(), tmp_path / "alice" / "delta")
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: called.append(a))
    unipelt.load(build("bert"), "alice/delta")  # a local folder of that name: read, not fetched
    assert not called
    with pytest.raises(unipelt.DeltaFileError, match="revision='v1' applies to a Hub repo id"):
        unipelt.load(build("bert"), folder, revision="v1")
    with pytest.raises(unipelt.DeltaFileError, match="holds no unipelt.json"):
        unipelt.load(build("bert"), str(tmp_path / "missing"))  # a path that is no repo id: no Hub call
    assert not called

"""DAPT/TAPT before fine-tuning, and ``unipelt sweep`` (plan, run, resume after a kill, report) on the CPU.

Runs use a 2-layer random BERT and a small JSONL task written here, so a whole grid takes seconds per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unipelt.cli import EXIT_BAD_INPUT, main
from unipelt.config import ConfigError
from unipelt.models import save_tiny_model
from unipelt.sweep import Spec, cpu_share, import_runs, load_spec, plan, run_sweep, write_report
from unipelt.train import RunConfig, run

WORDS = ["good", "bad", "film", "plot", "actor", "scene", "long", "short", "music", "story"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), max_position_embeddings=64)


@pytest.fixture(scope="module")
def text_task(tmp_path_factory) -> Path:
    """A JSONL task: the label says whether 'good' is in the text."""
    import random

    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        rows = []
        for _ in range(n):
            words = [rng.choice(WORDS[2:]) for _ in range(5)] + [rng.choice(["good", "bad"])]
            rng.shuffle(words)
            rows.append(json.dumps({"text": " ".join(words), "label": "pos" if "good" in words else "neg"}))
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def domain_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("domain") / "domain.txt"
    path.write_text("\n".join(f"the {a} of the {b} was {c} ." for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3],
                                                                             WORDS[5:] + WORDS[:5], strict=True)))
    return path


def _cfg(tiny_model: str, data: Path, out: Path, **kw) -> RunConfig:
    base = dict(task="text", method="full", model=tiny_model, data_dir=str(data), out=str(out), device="cpu",
                max_steps=4, eval_every=2, batch_size=8, max_length=32, progress=False)
    return RunConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- DAPT / TAPT


def test_dapt_then_tapt_then_fine_tuning_records_and_caches_the_pretraining(tiny_model, text_task, domain_text,
                                                                          tmp_path) -> None:
    cache = tmp_path / "cache"
    pretrain = {"max_steps": 3, "batch_size": 8, "max_length": 32}
    first = run(_cfg(tiny_model, text_task, tmp_path / "s1", dapt=[str(domain_text)], tapt=True,
                     pretrain_options=pretrain, pretrain_cache=str(cache)), log=lambda _: None)
    stages = first["pretraining"]
    assert [s["stage"] for s in stages] == ["dapt", "tapt"]
    assert [s["steps"] for s in stages] == [3, 3] and not any(s["cached"] for s in stages)
    assert stages[0]["lines"] == 10 and stages[1]["lines"] == 48  # TAPT reads the whole train split at full data
    assert all(s["wall_time_s"] > 0 for s in stages)
    assert first["label"] == "dapt+tapt"
    info = json.loads((tmp_path / "s1" / "run.json").read_text())
    assert info["model_path"] == stages[1]["path"]  # fine-tuning started from the adapted model
    tapt_meta = json.loads((Path(stages[1]["path"]) / "adaptive.json").read_text())
    assert tapt_meta["base"] == stages[0]["key"]  # TAPT continued from the DAPT model

    second = run(_cfg(tiny_model, text_task, tmp_path / "s2", seed=2, dapt=[str(domain_text)], tapt=True,
                      pretrain_options=pretrain, pretrain_cache=str(cache)), log=lambda _: None)
    assert [s["cached"] for s in second["pretraining"]] == [True, True]  # another seed reuses both models
    assert [s["path"] for s in second["pretraining"]] == [s["path"] for s in stages]

    other = run(_cfg(tiny_model, text_task, tmp_path / "s3", tapt=True, pretrain_options={**pretrain, "lr": 2e-4},
                     pretrain_cache=str(cache), method="lora"), log=lambda _: None)
    assert other["label"] == "tapt+lora"
    assert not other["pretraining"][0]["cached"]  # other settings, another model
    assert other["pretraining"][0]["path"] not in {s["path"] for s in stages}


def test_k_shot_tapt_reads_only_the_sampled_examples(tiny_model, text_task, tmp_path) -> None:
    pretrain = {"max_steps": 2, "batch_size": 8, "max_length": 32}
    results = [run(_cfg(tiny_model, text_task, tmp_path / f"s{seed}", seed=seed, k_shot=8, tapt=True,
                        pretrain_options=pretrain, pretrain_cache=str(tmp_path / "cache")), log=lambda _: None)
               for seed in (1, 2)]
    assert [r["pretraining"][0]["lines"] for r in results] == [8, 8]
    assert results[0]["pretraining"][0]["path"] != results[1]["pretraining"][0]["path"]  # another sample


def test_train_command_runs_dapt_tapt_in_one_go(tiny_model, text_task, domain_text, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["train", "--task", "text", "--method", "full", "--model", tiny_model, "--data-dir", str(text_task),
            "--out", str(out), "--dapt", str(domain_text), "--tapt", "--pretrain-max-steps", "2",
            "--pretrain-cache", str(tmp_path / "cache"), "--max-steps", "2", "--batch-size", "8",
            "--max-length", "32", "--device", "cpu", "--no-progress", "--no-save"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [s["steps"] for s in results["pretraining"]] == [2, 2]
    assert not (out / "model").exists() and not (out / "checkpoint.pt").exists()  # --no-save: results only
    bad = ["train", "--task", "text", "--method", "full", "--model", tiny_model, "--data-dir", str(text_task),
           "--out", str(tmp_path / "bad"), "--dapt", str(tmp_path / "missing.txt"), "--device", "cpu"]
    assert main(bad) == EXIT_BAD_INPUT


# ------------------------------------------------------------------------------------------------ plan


def _spec(tiny_model: str, data: Path, domain: Path | None = None, **extra) -> dict:
    spec = {
        "model": tiny_model, "data_dir": str(data), "seeds": [1, 2], "tasks": ["text"],
        "methods": {"full": {"method": "full", "reference": "full fine-tuning"},
                    "lora": {"reference": "microsoft/LoRA"},
                    "lora+big": {"method": "lora", "options": {"r": 4}}},
        "settings": {"k8": {"k_shot": 8, "max_steps": 4, "eval_every": 2}},
        "common": {"device": "cpu", "batch_size": 8, "max_length": 32},
    }
    if domain is not None:
        spec["methods"]["dapt+tapt"] = {"method": "full", "tapt": True, "dapt": {"text": [str(domain)]},
                                        "pretrain_options": {"max_steps": 2, "batch_size": 8, "max_length": 32}}
    return {**spec, **extra}


def test_plan_merges_settings_orders_seeds_first_and_skips_cells_without_domain_text(tiny_model, text_task,
                                                                                     domain_text, tmp_path) -> None:
    spec = _spec(tiny_model, text_task, domain_text, tasks=["text", "rte"])
    spec["settings"] = {"full": {"max_steps": 10, "batch_size": 4}, "k8": {"k_shot": 8, "tasks": ["text"]}}
    spec["task_options"] = {"rte": {"batch_size": 2}}
    spec["methods"]["lora"]["batch_size"] = 1
    jobs = plan(load_spec(spec), tmp_path)
    # seeds x (full: 2 tasks + k8: 1 task) x 4 methods
    assert len(jobs) == 2 * 3 * 4
    assert [j.seed for j in jobs] == [1] * 12 + [2] * 12
    by = {(j.task, j.setting, j.label, j.seed): j for j in jobs}
    assert by["rte", "full", "full", 1].config["batch_size"] == 2  # task_options over the setting
    assert by["text", "full", "full", 1].config["batch_size"] == 4  # the setting over common
    assert by["rte", "full", "lora", 1].config["batch_size"] == 1  # the method over everything
    assert by["text", "k8", "lora+big", 2].config["method_options"] == {"r": 4}
    assert by["text", "k8", "lora+big", 2].config["method"] == "lora"
    assert by["rte", "full", "dapt+tapt", 1].skip == "no domain text"
    assert by["text", "full", "dapt+tapt", 1].config["dapt"] == [str(domain_text)]
    assert by["text", "k8", "full", 2].run_dir == tmp_path / "runs" / "text" / "k8" / "full" / "seed2"


def test_grid_filters_pick_tasks_settings_methods_and_seeds(tiny_model, text_task, tmp_path) -> None:
    from unipelt.sweep import _part

    spec = _spec(tiny_model, text_task, tasks=["text", "rte"], seeds=[1, 2, 3])
    spec["settings"]["k16"] = {"k_shot": 16, "tasks": ["rte"]}
    grid = plan(load_spec(spec), tmp_path)
    part = _part(grid, {"seeds": ["3"], "methods": ["lora", "full"]})  # seeds arrive as text from the CLI
    assert {(j.seed, j.label) for j in part} == {(3, "lora"), (3, "full")}
    assert len(part) == 2 * (2 + 1)  # 2 methods x (k8 on both tasks + k16 on rte)
    assert {(j.task, j.setting) for j in _part(grid, {"tasks": ["rte"], "settings": ["k16"], "seeds": [1]})} \
        == {("rte", "k16")}
    with pytest.raises(ConfigError, match=r"--seeds names \['4'\]"):
        _part(grid, {"seeds": ["4"]})
    with pytest.raises(ConfigError, match="unknown grid filter"):
        _part(grid, {"seed": ["1"]})


@pytest.mark.parametrize("change, message", [
    ({"tasks": ["nosuchtask"]}, "unknown task"),
    ({"methods": {"lora": {"bogus": 1}}}, "unknown setting"),
    ({"settings": {"k8": {"epoch": 3}}}, "unknown setting"),
    ({"seeds": []}, "'seeds' is missing"),
    ({"extra": 1}, "unknown key"),
])
def test_bad_specs_name_the_problem(tiny_model, text_task, tmp_path, change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan(load_spec({**_spec(tiny_model, text_task), **change}), tmp_path)


# ------------------------------------------------------------------------------------------ run, report


def test_sweep_runs_the_grid_reports_it_and_skips_finished_runs(tiny_model, text_task, domain_text,
                                                                tmp_path) -> None:
    spec = load_spec(_spec(tiny_model, text_task, domain_text))
    spec.common["pretrain_cache"] = str(tmp_path / "cache")
    messages: list[str] = []
    summary = run_sweep(spec, tmp_path / "sweep", jobs=2, device="cpu", log=messages.append)
    assert summary["counts"] == {"grid": 8, "done": 8, "skipped": 0}
    assert any("[8/8 done, 0 failed" in m for m in messages), messages
    entries = {e["label"]: e for e in summary["entries"]}
    assert set(entries) == {"full", "lora", "lora+big", "dapt+tapt"}
    for label, entry in entries.items():
        runs = [json.loads((tmp_path / "sweep" / "runs" / "text" / "k8" / label / f"seed{s}" / "results.json")
                           .read_text()) for s in (1, 2)]
        assert entry["scores"] == [r["score"] for r in runs]
        assert entry["mean"] == pytest.approx(statistics.fmean(entry["scores"]))
        assert entry["std"] == pytest.approx(statistics.stdev(entry["scores"]))
        assert entry["trainable_params"] == runs[0]["trainable_params"]
        assert entry["trainable_percent"] == pytest.approx(100 * runs[0]["trainable_params"] / runs[0]["total_params"])
    assert entries["full"]["trainable_percent"] == pytest.approx(100.0)
    # two runs at once: each takes half the CPUs, not a thread pool as large as the machine
    assert {r["cpu_threads"] for r in runs} == {max(1, len(os.sched_getaffinity(0)) // 2)} == {cpu_share(2)}
    assert entries["lora+big"]["trainable_params"] < entries["full"]["trainable_params"]
    assert entries["lora"]["reference"] == "microsoft/LoRA"
    assert [p["stage"] for p in entries["dapt+tapt"]["pretraining"][0]] == ["dapt", "tapt"]
    # seed 2 reuses the DAPT model; at K-shot its TAPT reads another sample of K examples
    assert [p["cached"] for p in entries["dapt+tapt"]["pretraining"][1]] == [True, False]
    table = (tmp_path / "sweep" / "table.txt").read_text()
    for label in entries:
        assert label in table
    assert (tmp_path / "sweep" / "plot.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["counts"]["done"] == 8
    assert not list((tmp_path / "sweep").rglob("checkpoint.pt"))  # sweeps keep results only

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("results.json")}
    again: list[str] = []
    run_sweep(spec, tmp_path / "sweep", jobs=2, device="cpu", log=again.append)
    assert "8 done, 0 to run" in again[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("results.json")}

    # the finished runs move to another folder (another machine) as one file, and are not run there again
    carried = tmp_path / "runs.jsonl"
    assert main(["sweep", str(spec_file(spec, tmp_path)), "--out", str(tmp_path / "sweep"), "--report-only",
                 "--export-runs", str(carried)]) == 0
    assert len(carried.read_text().splitlines()) == 8
    moved = tmp_path / "moved"
    assert import_runs(spec, moved, carried) == {"imported": 8, "kept": 0, "not_in_grid": 0}
    assert import_runs(spec, moved, carried) == {"imported": 0, "kept": 8, "not_in_grid": 0}
    assert write_report(spec, moved)["entries"] == summary["entries"]
    there: list[str] = []
    run_sweep(spec, moved, jobs=1, device="cpu", log=there.append)
    assert "8 done, 0 to run" in there[0]
    spec.seeds = [1]  # lines of seed 2 belong to no run of this smaller grid
    assert import_runs(spec, tmp_path / "fewer", carried) == {"imported": 4, "kept": 0, "not_in_grid": 4}

    # score-only records (runs whose folders were lost, kept from the lines the sweep printed) count in the
    # report; the trainable counts come from a full record of the cell, else of the same task and label
    def score_only(results: dict) -> dict:
        kept = ("task", "method", "label", "seed", "k_shot", "split", "main_metric", "score", "metrics", "wall_time_s")
        return {**{k: results[k] for k in kept}, "record": "score", "source": "a printed line"}

    lines = [json.loads(line) for line in carried.read_text().splitlines()]
    mixed = []
    for line in lines:
        r = line["results"]
        if r["label"] == "lora" or (r["label"] == "full" and r["seed"] == 1):
            r = score_only(r)
        mixed.append({"run": line["run"], "results": r})
        if r["label"] == "lora+big":
            mixed.append({"run": line["run"].replace("/k8/", "/k4/"), "results": score_only(r)})
    mixed_file = tmp_path / "mixed.jsonl"
    mixed_file.write_text("".join(json.dumps(m) + "\n" for m in mixed))
    two = load_spec(_spec(tiny_model, text_task, domain_text))
    two.settings["k4"] = {"k_shot": 4, "max_steps": 4, "eval_every": 2}
    assert import_runs(two, tmp_path / "mixed", mixed_file)["imported"] == 10
    report = {(e["setting"], e["label"]): e for e in write_report(two, tmp_path / "mixed")["entries"]}
    full = report[("k8", "full")]
    assert full["scores"] == entries["full"]["scores"] and full["score_only_seeds"] == [1]
    assert full["trainable_params"] == entries["full"]["trainable_params"] and full["lr"] == entries["full"]["lr"]
    assert report[("k8", "lora")]["trainable_params"] is None  # no full record of lora anywhere
    assert report[("k8", "lora")]["mean"] == pytest.approx(entries["lora"]["mean"])
    k4 = report[("k4", "lora+big")]
    assert k4["n"] == 2 and k4["trainable_params"] == entries["lora+big"]["trainable_params"] and k4["lr"] is None
    assert k4["trainable_percent"] == pytest.approx(entries["lora+big"]["trainable_percent"])
    table = (tmp_path / "mixed" / "table.txt").read_text()
    assert "setting k4" in table and "lora+big" in table


def spec_file(spec, folder: Path) -> Path:
    """``spec`` (a Spec) as a JSON file the command line reads."""
    path = folder / "spec.json"
    path.write_text(json.dumps({k: v for k, v in spec.__dict__.items() if k != "description"}))
    return path


@pytest.mark.parametrize("content", ['{"run": "text/k8/lora/seed1"}\n', "not json\n"])
def test_importing_a_bad_runs_file_is_a_one_line_error(tiny_model, text_task, tmp_path, capsys, content) -> None:
    bad = tmp_path / "runs.jsonl"
    bad.write_text(content)
    path = spec_file(load_spec(_spec(tiny_model, text_task)), tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--report-only", "--import-runs", str(bad)]) \
        == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ":1 is not a run line" in err and "--export-runs" in err, err
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--import-runs", str(tmp_path / "none.jsonl")]) \
        == EXIT_BAD_INPUT
    assert "cannot read the runs file" in capsys.readouterr().err


def test_a_failed_run_is_reported_and_the_rest_finish(tiny_model, text_task, tmp_path) -> None:
    spec = _spec(tiny_model, text_task, seeds=[1])
    spec["methods"] = {"lora": {}, "broken": {"method": "lora", "lr": float("inf")}}
    messages: list[str] = []
    summary = run_sweep(load_spec(spec), tmp_path, jobs=1, device="cpu", log=messages.append)
    entries = {e["label"]: e for e in summary["entries"]}
    assert entries["lora"]["n"] == 1 and entries["broken"]["n"] == 0 and entries["broken"]["failed_seeds"] == [1]
    assert any(m.startswith("FAILED text/k8/broken/seed1") and "loss became" in m for m in messages), messages


def test_killed_sweep_resumes_its_interrupted_run(tiny_model, text_task, tmp_path) -> None:
    spec = _spec(tiny_model, text_task, seeds=[1])
    spec["methods"] = {"lora": {}}
    spec["settings"] = {"k8": {"k_shot": 8, "max_steps": 400, "eval_every": 1, "patience": 1000}}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    run_dir = out / "runs" / "text" / "k8" / "lora" / "seed1"
    command = [sys.executable, "-m", "unipelt.cli", "sweep", str(spec_file), "--out", str(out), "--device", "cpu"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waited = time.monotonic()
        while not (run_dir / "checkpoint.pt").exists():
            assert time.monotonic() - waited < 120, "no checkpoint appeared"
            assert process.poll() is None, "the sweep ended before it was killed"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and its run, as a lost machine would
        process.wait()
    assert not (run_dir / "results.json").exists()
    assert main(["sweep", str(spec_file), "--out", str(out), "--device", "cpu"]) == 0
    assert "resuming" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 400


def test_export_runs_is_kept_current_so_a_killed_sweep_leaves_what_it_finished(tiny_model, text_task,
                                                                              tmp_path) -> None:
    """A lent machine's time limit killed a device call once before its end-of-sweep export: every finished run of
    that call was lost. The running sweep now rewrites the export after each run."""
    spec = _spec(tiny_model, text_task, seeds=[1])
    spec["methods"] = {"quick": {"method": "lora", "max_steps": 4},
                       "slow": {"method": "lora", "max_steps": 100000, "patience": 100000}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out, exported = tmp_path / "sweep", tmp_path / "out" / "runs.jsonl"
    exported.parent.mkdir()
    slow_dir = out / "runs" / "text" / "k8" / "slow" / "seed1"
    command = [sys.executable, "-m", "unipelt.cli", "sweep", str(tmp_path / "spec.json"), "--out", str(out),
               "--device", "cpu", "--export-runs", str(exported)]
    sweep = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waited = time.monotonic()
        while not (slow_dir / "checkpoint.pt").exists():  # the quick run has finished, the slow one is training
            assert time.monotonic() - waited < 120, "the slow run wrote no checkpoint"
            assert sweep.poll() is None, "the sweep ended before it was killed"
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)  # no end-of-sweep step runs
        sweep.wait()
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [line["run"] for line in lines] == ["text/k8/quick/seed1"]
    assert lines[0]["results"]["steps"] == 4
    assert import_runs(load_spec(spec), tmp_path / "elsewhere", exported)["imported"] == 1


def test_deadline_stops_runs_and_the_report_shows_what_finished(tiny_model, text_task, tmp_path) -> None:
    spec = load_spec(_spec(tiny_model, text_task, seeds=[1]))
    spec.settings["k8"].update(max_steps=100000, eval_every=2, patience=100000)
    messages: list[str] = []
    summary = run_sweep(spec, tmp_path, jobs=1, device="cpu", deadline=25, log=messages.append)
    assert summary["counts"]["done"] == 0
    assert any(m.startswith("deadline: stopped text/k8/full/seed1") for m in messages), messages
    assert any((tmp_path / "runs").rglob("checkpoint.pt"))  # the stopped run resumes next time
    assert write_report(spec, tmp_path)["counts"]["done"] == 0


def test_a_sweep_whose_reader_goes_away_still_keeps_its_deadline(tiny_model, text_task, tmp_path) -> None:
    """``unipelt sweep ... | head -1``: the closed pipe must not stop the scheduler, or its runs go on past the
    deadline (a device call's runs did so once)."""
    spec = _spec(tiny_model, text_task, seeds=[1])
    spec["methods"] = {"lora": {}}
    spec["settings"] = {"k8": {"k_shot": 8, "max_steps": 100000, "eval_every": 2, "patience": 100000}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "unipelt.cli", "sweep", str(tmp_path / "spec.json"), "--out", str(out),
               "--device", "cpu", "--deadline", "15"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout.readline().startswith(b"sweep: 1 runs")
        process.stdout.close()  # the reader goes, as `head -1` does
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of it
        process.wait()
    assert b"Broken pipe" not in process.stderr.read()
    assert (out / "summary.json").exists()
    assert (out / "runs" / "text" / "k8" / "lora" / "seed1" / "checkpoint.pt").exists()  # stopped at the deadline


def test_under_a_deadline_a_run_its_cell_says_cannot_finish_is_not_started(tiny_model, text_task, tmp_path) -> None:
    spec = _spec(tiny_model, text_task)
    spec["methods"] = {"full": {"method": "full"}, "lora": {}}
    spec = load_spec(spec)
    run_sweep(spec, tmp_path, device="cpu", only={"methods": ["lora"], "seeds": [1]}, log=lambda m: None)
    finished = tmp_path / "runs" / "text" / "k8" / "lora" / "seed1" / "results.json"
    results = json.loads(finished.read_text())
    results["wall_time_s"] = 1000.0  # as if this cell's runs took 1,000 s on this machine
    finished.write_text(json.dumps(results))
    messages: list[str] = []
    summary = run_sweep(spec, tmp_path, device="cpu", deadline=300, log=messages.append)
    done = {(e["label"], s) for e in summary["entries"] for s in e.get("seeds", [])}
    assert done == {("lora", 1), ("full", 1), ("full", 2)}  # full has no finished run to go by: it starts
    assert any("1 runs not started, as the finished runs of their cells took longer" in m for m in messages), \
        messages
    assert not (tmp_path / "runs" / "text" / "k8" / "lora" / "seed2").exists()
    run_sweep(spec, tmp_path, device="cpu", log=lambda m: None)  # no deadline: it runs
    assert (tmp_path / "runs" / "text" / "k8" / "lora" / "seed2" / "results.json").exists()


def _lora_sweep_whose_seed1_took(seconds: float, tiny_model: str, text_task: Path, out: Path,
                                 device: str | None = None) -> tuple[Spec, Path]:
    """A LoRA-only sweep of seeds 1-3 whose seed 1 has run and is recorded as taking ``seconds`` (on
    ``device``, where given). Returns the spec and that run's results file."""
    spec = _spec(tiny_model, text_task, seeds=[1, 2, 3])
    spec["methods"] = {"lora": {}}
    spec = load_spec(spec)
    run_sweep(spec, out, device="cpu", only={"seeds": [1]}, log=lambda m: None)
    finished = out / "runs" / "text" / "k8" / "lora" / "seed1" / "results.json"
    results = json.loads(finished.read_text())
    assert results["device"] == "cpu"
    results["wall_time_s"] = seconds
    results["device"] = device or results["device"]
    finished.write_text(json.dumps(results))
    return spec, finished


def test_a_finished_run_on_another_device_kind_does_not_hold_its_cell_back(tiny_model, text_task, tmp_path) -> None:
    """A cell's CPU run of an hour must not keep its other seeds off a GPU call's deadline, nor a GPU run's
    seconds make a CPU sweep start what it cannot finish: the estimate reads runs of the sweep's own kind."""
    spec, finished = _lora_sweep_whose_seed1_took(1000.0, tiny_model, text_task, tmp_path, device="cuda")
    run_sweep(spec, tmp_path, device="cpu", deadline=300, only={"seeds": [2]}, log=lambda m: None)
    assert (tmp_path / "runs" / "text" / "k8" / "lora" / "seed2" / "results.json").exists()  # it started
    results = json.loads(finished.read_text())
    results["device"] = "cpu"  # the same seconds on this kind hold the next seed back
    finished.write_text(json.dumps(results))
    messages: list[str] = []
    run_sweep(spec, tmp_path, device="cpu", deadline=300, log=messages.append)
    assert not (tmp_path / "runs" / "text" / "k8" / "lora" / "seed3").exists()
    assert any("1 runs not started, as the finished runs of their cells took longer" in m for m in messages)


def test_start_late_starts_what_the_deadline_estimate_would_hold_back(tiny_model, text_task, tmp_path) -> None:
    """On a machine that stays up between calls, a run cut at the deadline resumes from its checkpoint on
    the next, so a cell longer than any one call can still be run: ``start_late`` starts it anyway."""
    spec, _ = _lora_sweep_whose_seed1_took(1000.0, tiny_model, text_task, tmp_path)
    messages: list[str] = []
    run_sweep(spec, tmp_path, device="cpu", deadline=300, only={"seeds": [2]}, log=messages.append)
    assert not (tmp_path / "runs" / "text" / "k8" / "lora" / "seed2").exists()
    assert any("--start-late" in m for m in messages), messages
    run_sweep(spec, tmp_path, device="cpu", deadline=300, only={"seeds": [2]}, log=lambda m: None,
              start_late=True)
    assert (tmp_path / "runs" / "text" / "k8" / "lora" / "seed2" / "results.json").exists()



def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (killed, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_sweep_stops_its_runs_too(tiny_model, text_task, tmp_path) -> None:
    """``kill SWEEP_PID`` (not the process group) once left its run training on, unsupervised, for an hour."""
    spec = _spec(tiny_model, text_task, seeds=[1])
    spec["methods"] = {"lora": {}}
    spec["settings"] = {"k8": {"k_shot": 8, "max_steps": 100000, "eval_every": 2, "patience": 100000}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "unipelt.cli", "sweep", str(tmp_path / "spec.json"), "--out",
               str(tmp_path / "sweep"), "--device", "cpu"]
    sweep = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children")
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline:  # the run's process, not the resource tracker
            workers = [int(p) for p in children.read_text().split()
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
            time.sleep(0.2)
        assert workers, "the sweep started no run"
        sweep.terminate()  # SIGTERM to the sweep alone
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(workers[0]), "the run went on after its sweep was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()

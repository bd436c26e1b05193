"""Grids of runs: tasks x methods x seeds x settings, run several at a time, resumable, then one report.

A sweep is described by a spec (a YAML or JSON file, or a dict)::

    model: null                      # the base model (default: the embedded MiniLM)
    data_dir: ../shared/data         # the data root: every task finds its folder below it
    seeds: [1, 2, 3]
    tasks: [rte, chemprot, squad]
    methods:                         # row label -> the run's settings; "method" defaults to the label
      full: {method: full}
      dapt+tapt: {method: full, tapt: true, dapt: {chemprot: [../shared/data/domain_text/biomed.txt]}}
      unipelt+prompt: {method: unipelt, options: {prompt: {length: 10}}, reference: "..."}
    settings:                        # column groups; "tasks" restricts one to some tasks
      full: {epochs: 10, max_steps: 3000}
      k100: {k_shot: 100, epochs: 30, tasks: [rte]}
    common: {save: false}            # RunConfig fields for every run
    task_options: {squad: {batch_size: 16}}

Settings are ``RunConfig`` fields; ``options`` is the method's options (``--set``); ``dapt`` is a list of
text files for every task or a mapping task -> files, and a task without one is skipped ("no domain text").
Fields are merged common < setting < task_options < method.

Each run writes into ``OUT/runs/TASK/SETTING/LABEL/seedN`` (``log.txt`` holds its output). A run with a
``results.json`` is skipped, one with a checkpoint resumes, so killing a sweep and starting it again
loses at most the steps since each run's last validation. Under a deadline, a run whose cell's finished
runs took longer than the time left is not started. ``export_runs`` / ``import_runs`` carry the finished
runs to another machine as one file. Runs are separate processes, ``jobs`` per GPU
on every visible GPU (or on the CPU); seeds are the outer loop, so the first seed of every cell finishes
first and a DAPT/TAPT model pretrained there serves the later seeds from the cache.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ConfigError
from .serialization import atomic_write_text

RESULTS_FILE, FAILED_FILE, LOG_FILE, SUMMARY_FILE = "results.json", "failed.json", "log.txt", "summary.json"
_SPEC_KEYS = {"model", "data_dir", "seeds", "tasks", "methods", "settings", "common", "task_options", "out",
              "description"}
_ENTRY_KEYS = {"options", "dapt", "reference"}  # besides RunConfig's fields
_OWN_FIELDS = {"task", "out", "seed", "resume", "progress", "label"}  # the sweep sets these


@dataclass
class Job:
    task: str
    setting: str
    label: str
    seed: int
    config: dict[str, Any]  # RunConfig keyword arguments
    run_dir: Path
    skip: str | None = None  # why this cell is not run
    reference: str | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.setting}/{self.label}/seed{self.seed}"

    def done(self) -> bool:
        return (self.run_dir / RESULTS_FILE).exists()


@dataclass
class Spec:
    tasks: list[str]
    methods: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    seeds: list[int]
    model: str | None = None
    data_dir: str | None = None
    common: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""


def load_spec(source: str | os.PathLike | dict[str, Any]) -> Spec:
    """A :class:`Spec` from a YAML/JSON file or a dict; malformed specs are a ConfigError naming the key."""
    if isinstance(source, dict):
        data, where = source, "the sweep spec"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep spec {path} does not exist")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(path.read_text())
            else:
                data = json.loads(path.read_text())
        except Exception as e:
            raise ConfigError(f"cannot parse sweep spec {path}: {e}") from e
        where = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping with tasks, methods, seeds and settings")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_SPEC_KEYS)}")
    for key in ("tasks", "methods", "seeds"):
        if not data.get(key):
            raise ConfigError(f"{where}: '{key}' is missing or empty")
    methods = data["methods"]
    if isinstance(methods, list):
        methods = {name: {} for name in methods}
    settings = data.get("settings") or {"full": {}}
    for label, entry in {**methods, **settings}.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"{where}: entry {label!r} must be a mapping of settings")
    return Spec(tasks=[str(t) for t in data["tasks"]], methods={k: dict(v or {}) for k, v in methods.items()},
                settings={k: dict(v or {}) for k, v in settings.items()}, seeds=[int(s) for s in data["seeds"]],
                model=data.get("model"), data_dir=data.get("data_dir"), common=dict(data.get("common") or {}),
                task_options={k: dict(v) for k, v in (data.get("task_options") or {}).items()},
                description=str(data.get("description", "")))


def _check_fields(entry: dict[str, Any], where: str, extra: set[str] = frozenset()) -> None:
    from .train import RunConfig

    known = {f.name for f in fields(RunConfig)} - _OWN_FIELDS
    unknown = sorted(set(entry) - known - extra)
    if unknown:
        raise ConfigError(f"sweep spec: {where} has unknown setting(s) {unknown}; use RunConfig fields "
                          f"({', '.join(sorted(known))}) or {sorted(extra)}")


def plan(spec: Spec, out: str | os.PathLike) -> list[Job]:
    """Every run of the grid, seeds outermost, with its merged settings and run folder."""
    from .tasks import TaskDataError, get_task

    out = Path(out)
    for task in spec.tasks:
        try:
            get_task(task)  # an unknown task fails here, before anything runs
        except TaskDataError as e:
            raise ConfigError(f"sweep spec: {e}") from e
    _check_fields(spec.common, "common")
    for name, options in spec.task_options.items():
        _check_fields(options, f"task_options.{name}")
    for name, entry in spec.settings.items():
        _check_fields(entry, f"setting {name!r}", {"tasks"})
    for label, entry in spec.methods.items():
        _check_fields(entry, f"method {label!r}", _ENTRY_KEYS)
        if "/" in label or label.startswith("."):
            raise ConfigError(f"sweep spec: method label {label!r} cannot hold '/' or start with '.'")
    jobs = []
    for seed in spec.seeds:
        for setting, setting_entry in spec.settings.items():
            tasks = setting_entry.get("tasks", spec.tasks)
            for task in [t for t in spec.tasks if t in tasks]:
                for label, entry in spec.methods.items():
                    config: dict[str, Any] = {"model": spec.model, "data_dir": spec.data_dir, "save": False,
                                              **spec.common, **{k: v for k, v in setting_entry.items() if k != "tasks"},
                                              **spec.task_options.get(task, {}),
                                              **{k: v for k, v in entry.items() if k not in _ENTRY_KEYS}}
                    config.setdefault("method", label)
                    if "options" in entry:
                        config["method_options"] = dict(entry["options"])
                    skip = None
                    dapt = entry.get("dapt")
                    if isinstance(dapt, dict):
                        dapt = dapt.get(task)
                        skip = None if dapt else "no domain text"
                    if dapt:
                        files = [dapt] if isinstance(dapt, str) else dapt
                        config["dapt"] = [str(d).replace("{data_dir}", str(spec.data_dir)) for d in files]
                    jobs.append(Job(task, setting, label, seed, config, out / "runs" / task / setting / label /
                                    f"seed{seed}", skip, entry.get("reference")))
    return jobs


# ------------------------------------------------------------------------------------------------- run


def _die_with(parent: int) -> None:
    """Linux: this process is killed when the sweep that started it dies (prctl PR_SET_PDEATHSIG), however it
    dies. Otherwise ``kill SWEEP_PID`` leaves its runs training unsupervised, taking the cores and writing into
    the sweep folder; killed, a run loses only the steps since its checkpoint."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the sweep died before the call above
        os._exit(1)


def _worker(job_config: dict[str, Any], task: str, seed: int, label: str, run_dir: str, gpu: str | None,
            threads: int | None = None, parent: int | None = None) -> None:
    """One run in its own process: output into the run's log, a failure into failed.json. ``threads``: the
    process's share of the CPU threads when several runs share the machine; ``parent``: the sweep's pid, whose
    death ends this run too."""
    if parent is not None:
        _die_with(parent)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / LOG_FILE, "a", buffering=1)  # noqa: SIM115 - open for the whole process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        import torch
        import transformers

        from .train import RunConfig, run

        transformers.logging.set_verbosity_error()
        if threads is not None:
            torch.set_num_threads(threads)
        (folder / FAILED_FILE).unlink(missing_ok=True)
        resume = (folder / "checkpoint.pt").exists()
        cfg = RunConfig(task=task, seed=seed, out=run_dir, label=label, resume=resume, progress=False,
                        **job_config)
        run(cfg)
    except BaseException as e:  # noqa: BLE001 - any failure is recorded for the report, then the process ends
        traceback.print_exc()
        atomic_write_text(folder / FAILED_FILE, json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        sys.exit(1)


def cpu_share(processes: int) -> int | None:
    """CPU threads for each of ``processes`` runs at once: an even share of this process's CPUs, or None (torch's
    default) for a single run. Each spawned run would otherwise start a thread pool as large as the machine, and
    24 runs on 16 cores oversubscribe it (torchrun sets one thread per process for the same reason)."""
    if processes <= 1:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // processes)


def visible_gpus() -> list[str]:
    """The GPUs runs are spread over: CUDA_VISIBLE_DEVICES's entries, else every device torch sees."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_sweep(spec: Spec, out: str | os.PathLike, jobs: int = 1, gpus: Sequence[str] | None = None,
              deadline: float | None = None, device: str | None = None, only: dict[str, Sequence[str]] | None = None,
              log: Callable[[str], None] = print, start_late: bool = False,
              export_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run every unfinished job of the grid, ``jobs`` at a time per GPU (or on the CPU), then write the
    report. ``deadline`` (seconds from now): start nothing after it and stop what runs (it resumes next
    time); before it, a run its cell's finished runs say cannot finish in time is not started, unless
    ``start_late`` (for a machine that stays up: the next sweep there resumes it from its checkpoint).
    ``only`` runs part of the grid: ``{"tasks": [...], "settings": [...], "methods": [...], "seeds": [...]}``;
    the report still covers the whole grid. ``export_to``: keep that file (:func:`export_runs`) current from
    the start and after every finished run, so a sweep killed from outside (a lent machine's time limit) still
    leaves what it finished. Returns the report's summary."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    grid = plan(spec, out)
    part = _part(grid, only or {})
    from .train.loop import exclusive_folder

    with exclusive_folder(out, "sweep"):
        return _run_locked(spec, out, grid, part, jobs, gpus, deadline, device, log, start_late, export_to)


def _run_locked(spec: Spec, out: Path, grid: list[Job], part: list[Job], jobs: int, gpus: Sequence[str] | None,
                deadline: float | None, device: str | None, log: Callable[[str], None],
                start_late: bool = False, export_to: str | os.PathLike | None = None) -> dict[str, Any]:
    atomic_write_text(out / "spec.json", json.dumps(spec.__dict__, indent=2, default=str) + "\n")
    if export_to is not None:
        export_runs(spec, out, export_to)
    if device == "cpu":
        gpus = []
    elif gpus is None:
        gpus = visible_gpus()
    slots = [g for g in gpus for _ in range(jobs)] if gpus else [None] * jobs
    threads = cpu_share(len(slots))
    todo = [j for j in part if j.skip is None and not j.done()]
    runnable = len([j for j in part if j.skip is None])
    finished_before = runnable - len(todo)
    where = ", ".join(f"GPU {g}" for g in gpus) or "CPU"
    log(f"sweep: {len(part)} runs in the {'part of the ' if len(part) < len(grid) else ''}grid, "
        f"{runnable - len(todo)} done, {len(todo)} to run, {len(part) - runnable} skipped; "
        f"{len(slots)} at a time on {where}")
    context = multiprocessing.get_context("spawn")
    running: dict[Any, tuple[Job, str | None]] = {}
    free = list(slots)
    failed: list[str] = []
    done_now = 0
    start = time.monotonic()
    last_line = 0.0
    stop_at = start + deadline if deadline is not None else math.inf

    def progress(force: bool = False) -> None:
        nonlocal last_line
        now = time.monotonic()
        if not force and now - last_line < 60:
            return
        last_line = now
        elapsed = now - start
        left = len(todo) + len(running)
        eta = f", ~{_duration(elapsed / done_now * left)} left" if done_now else ""  # at the rate so far
        log(f"[{finished_before + done_now}/{runnable} done, {len(failed)} failed, {len(running)} running] "
            f"{_duration(elapsed)} elapsed{eta}")

    kind = device.split(":")[0] if device else ("cuda" if gpus else "cpu")
    expected = _expected_seconds(grid, kind) if deadline is not None and not start_late else {}
    too_long: list[Job] = []
    while todo or running:
        while todo and free and time.monotonic() < stop_at:
            left = stop_at - time.monotonic()
            job = next((j for j in todo if expected.get(_cell(j), 0.0) <= left), None)
            if job is None:  # each would be stopped at the deadline and start again from scratch elsewhere
                too_long, todo = todo, []
                break
            todo.remove(job)
            gpu = free.pop(0)
            config = dict(job.config)
            if device is not None:
                config.setdefault("device", device)
            process = context.Process(target=_worker, args=(config, job.task, job.seed, job.label,
                                                            str(job.run_dir), gpu, threads, os.getpid()),
                                      daemon=False)
            process.start()
            running[process] = (job, gpu)
        if time.monotonic() >= stop_at:
            for process, (job, _) in running.items():
                process.kill()
                process.join()
                log(f"deadline: stopped {job.name} (it resumes from its checkpoint next time)")
            running.clear()
            break
        time.sleep(0.5)
        for process in [p for p in running if not p.is_alive()]:
            job, gpu = running.pop(process)
            process.join()
            free.append(gpu)
            if job.done():
                done_now += 1
                result = json.loads((job.run_dir / RESULTS_FILE).read_text())
                log(f"done {job.name}: {result['main_metric']} {result['score']:.4f} "
                    f"({result['wall_time_s']:.0f} s)")
                if export_to is not None:
                    export_runs(spec, out, export_to)
                progress(force=True)
            else:
                reason = _failure(job, process.exitcode)
                failed.append(job.name)
                log(f"FAILED {job.name}: {reason} (log: {job.run_dir / LOG_FILE})")
        progress()
    if too_long:
        log(f"deadline: {len(too_long)} runs not started, as the finished runs of their cells took longer than "
            f"the time left; run again with a longer --deadline, or with --start-late on a machine that stays up")
    if todo:
        log(f"deadline: {len(todo)} runs not started; run the same command again to continue")
    summary = write_report(spec, out, grid)
    log(f"sweep: {finished_before + done_now}/{runnable} runs done, {len(failed)} failed now; "
        f"report in {out / SUMMARY_FILE}")
    return summary


def _cell(job: Job) -> tuple[str, str, str]:
    return job.task, job.setting, job.label


def _expected_seconds(grid: Sequence[Job], kind: str) -> dict[tuple[str, str, str], float]:
    """How long a run of each cell is expected to take on a ``kind`` device ("cuda", "cpu"), from its finished
    runs on that kind (imported ones too; a record that names no device counts): the longest, pretraining that
    was not cached included, plus a fifth and 15 s for starting a process. Under a deadline a run that would not
    finish in time is not started: a machine that is given back keeps no checkpoint, so it would start again
    from scratch on the next. Runs on another kind are left out, as a CPU run's hour would keep its cell off a
    GPU call for good."""
    longest: dict[tuple[str, str, str], float] = {}
    for job in grid:
        if not job.done():
            continue
        try:
            r = json.loads((job.run_dir / RESULTS_FILE).read_text())
            if str(r.get("device") or kind).split(":")[0] != kind:
                continue
            seconds = float(r["wall_time_s"]) + sum(float(p.get("wall_time_s") or 0.0)
                                                    for p in r.get("pretraining", []) if not p.get("cached"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        longest[_cell(job)] = max(longest.get(_cell(job), 0.0), seconds)
    return {cell: 1.2 * seconds + 15.0 for cell, seconds in longest.items()}


def _part(grid: list[Job], only: dict[str, Sequence[Any]]) -> list[Job]:
    keys = {"tasks": "task", "settings": "setting", "methods": "label", "seeds": "seed"}
    unknown = sorted(set(only) - set(keys))
    if unknown:
        raise ConfigError(f"unknown grid filter(s) {unknown}; use {sorted(keys)}")
    wanted = {name: {str(v) for v in values} for name, values in only.items()}  # seeds come as text from the CLI
    for name, values in wanted.items():
        present = {str(getattr(j, keys[name])) for j in grid}
        missing = sorted(values - present)
        if missing:
            raise ConfigError(f"--{name} names {missing}, which the spec's grid lacks ({sorted(present)})")
    return [j for j in grid if all(str(getattr(j, keys[n])) in v for n, v in wanted.items())]


def _failure(job: Job, exitcode: int | None) -> str:
    try:
        return json.loads((job.run_dir / FAILED_FILE).read_text())["error"]
    except (OSError, ValueError, KeyError):
        return f"the process ended with code {exitcode} and no results (killed, or out of memory)"


# ------------------------------------------------------------------------------------ moving a sweep


def export_runs(spec: Spec, out: str | os.PathLike, path: str | os.PathLike) -> int:
    """Write every finished run of the grid as one JSON line ``{"run": NAME, "results": {...}}`` into ``path``
    (atomically); returns how many. With :func:`import_runs` a sweep moves between machines as one small
    file: the results only, no checkpoints or models (a GPU machine that is lent for minutes keeps nothing)."""
    lines = [json.dumps({"run": job.name, "results": json.loads((job.run_dir / RESULTS_FILE).read_text())},
                        separators=(",", ":")) for job in plan(spec, out) if job.done()]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def import_runs(spec: Spec, out: str | os.PathLike, path: str | os.PathLike) -> dict[str, int]:
    """Give each run of ``path`` (written by :func:`export_runs`) that the grid plans and that has no results
    yet its ``results.json``, so the sweep skips it; a run already finished here is kept as it is. Returns
    the counts ``imported``, ``kept`` (finished here already) and ``not_in_grid`` (lines of another spec)."""
    jobs = {job.name: job for job in plan(spec, out)}
    counts = {"imported": 0, "kept": 0, "not_in_grid": 0}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the runs file {path} ({e.strerror}); pass a file --export-runs wrote") \
            from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, results = record["run"], record["results"]
            float(results["score"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number} is not a run line of --export-runs ({{\"run\": ..., \"results\": "
                              f"...}}); pass a file that --export-runs wrote") from None
        job = jobs.get(name)
        if job is None:
            counts["not_in_grid"] += 1
        elif job.done():
            counts["kept"] += 1
        else:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job.run_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
            counts["imported"] += 1
    return counts


# ---------------------------------------------------------------------------------------------- report


def _percent_scale(task: str) -> float:
    """Table scores in percent: SQuAD's metrics already are; GLUE's and the domains' are fractions."""
    return 1.0 if task == "squad" else 100.0


# What a run reports about its model and recipe, the same for every seed of a cell (and, but for the
# recipe, for the same task and label in every setting). A score-only record (``"record": "score"``: a
# run whose folder was lost, kept from the line the sweep printed) lacks them; they come from a sibling.
_CELL_FIELDS = ("trainable_params", "total_params", "model", "lr", "train_examples", "report_examples")
_MODEL_FIELDS = ("trainable_params", "total_params", "model")


def summarize(spec: Spec, grid: Sequence[Job]) -> dict[str, Any]:
    """One entry per task x setting x label: per-seed scores, mean, std, every metric, trainable parameters."""
    cells: dict[tuple[str, str, str], list[Job]] = {}
    for job in grid:
        cells.setdefault((job.task, job.setting, job.label), []).append(job)
    finished = {key: [json.loads((j.run_dir / RESULTS_FILE).read_text()) for j in jobs if j.done()]
                for key, jobs in cells.items()}
    entries = []
    for (task, setting, label), jobs in cells.items():
        entry: dict[str, Any] = {"task": task, "setting": setting, "label": label, "method": jobs[0].config["method"],
                                 "k_shot": jobs[0].config.get("k_shot"), "reference": jobs[0].reference,
                                 "seeds_planned": [j.seed for j in jobs]}
        if jobs[0].skip:
            entries.append({**entry, "skipped": jobs[0].skip})
            continue
        results = finished[(task, setting, label)]
        failed = [j.seed for j in jobs if not j.done() and (j.run_dir / FAILED_FILE).exists()]
        entry.update(seeds=[r["seed"] for r in results], failed_seeds=failed, n=len(results))
        if results:
            scores = [float(r["score"]) for r in results]
            metric_names = sorted({m for r in results for m in r["metrics"]})
            full = next((r for r in results if "trainable_params" in r), None)
            sibling = full or next((r for (t, _, lab), rs in finished.items() if t == task and lab == label
                                    for r in rs if "trainable_params" in r), None)
            about = {k: (full or {}).get(k) for k in _CELL_FIELDS}
            about.update({k: sibling[k] for k in _MODEL_FIELDS} if sibling else {})
            entry.update(
                main_metric=results[0]["main_metric"], split=results[0]["split"], scores=scores,
                mean=statistics.fmean(scores), std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
                metrics={m: {"values": [r["metrics"][m] for r in results if m in r["metrics"]],
                             "mean": statistics.fmean(r["metrics"][m] for r in results if m in r["metrics"]),
                             "std": statistics.stdev([r["metrics"][m] for r in results if m in r["metrics"]])
                             if sum(m in r["metrics"] for r in results) > 1 else 0.0} for m in metric_names},
                **about,
                trainable_percent=100.0 * about["trainable_params"] / about["total_params"]
                if about["trainable_params"] is not None else None,
                steps=[r.get("steps") for r in results],
                wall_time_s=[round(r["wall_time_s"], 1) for r in results],
                pretraining=[[{k: p.get(k) for k in ("stage", "text", "lines", "steps", "wall_time_s", "cached")}
                              for p in r.get("pretraining", [])] for r in results],
            )
            score_only = [r["seed"] for r in results if r.get("record") == "score"]
            if score_only:
                entry["score_only_seeds"] = score_only
                entry["score_only_source"] = next(r.get("source") for r in results if r.get("record") == "score")
        entries.append(entry)
    return {"description": spec.description, "model": spec.model or "embedded all-MiniLM-L6-v2",
            "seeds": spec.seeds, "settings": spec.settings, "entries": entries}


def _columns(entries: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[tuple[str, str]]:
    """(task, metric) columns: each task's main metric, and SQuAD's exact match beside its F1."""
    cols = []
    for task in tasks:
        found = [e for e in entries if e["task"] == task and e.get("n")]
        if not found:
            continue
        if task == "squad":
            cols += [(task, "exact_match"), (task, "f1")]
        else:
            cols.append((task, found[0]["main_metric"]))
    return cols


def format_tables(summary: dict[str, Any], tasks: Sequence[str]) -> str:
    """One table per setting: a row per method label, a column per task (mean ± std over seeds, in percent),
    the average over the columns, and the trainable parameters as a share of the model."""
    lines = []
    for setting in summary["settings"]:
        entries = [e for e in summary["entries"] if e["setting"] == setting]
        cols = _columns(entries, tasks)
        if not cols:
            continue
        labels = list(dict.fromkeys(e["label"] for e in entries))
        header = ["method", *(t if t != "squad" else f"squad {'EM' if m == 'exact_match' else 'F1'}" for t, m in cols),
                  "avg", "params %"]
        rows = []
        for label in labels:
            by_task = {e["task"]: e for e in entries if e["label"] == label}
            cells, values = [], []
            for task, metric in cols:
                e = by_task.get(task)
                if e is None:
                    cells.append("")
                elif e.get("skipped"):
                    cells.append("n/a")
                elif not e.get("n"):
                    cells.append("-")
                else:
                    m = e["metrics"][metric]
                    scale = _percent_scale(task)
                    cells.append(f"{scale * m['mean']:.1f}±{scale * m['std']:.1f}" + ("" if e["n"] >= len(
                        e["seeds_planned"]) else f" ({e['n']})"))
                    if task != "squad" or metric == "f1":
                        values.append(scale * m["mean"])
            expected = len([c for c in cols if c[0] != "squad" or c[1] == "f1"])
            avg = f"{statistics.fmean(values):.1f}" + ("" if len(values) == expected else f" ({len(values)})") \
                if values else ""
            shares = [e["trainable_percent"] for e in by_task.values() if e.get("trainable_percent") is not None]
            rows.append([label, *cells, avg, f"{statistics.fmean(shares):.3g}" if shares else ""])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append(f"setting {setting} ({summary['settings'][setting]})".replace("'", ""))
        lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths,
                                                                                                   strict=True))))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                strict=True)))
                  for r in rows]
        lines.append("")
    lines.append("scores in percent, mean ± std over seeds; (n): over n seeds or columns only; n/a: not run "
                 "(no domain text); params %: trainable parameters over the model's, averaged over tasks")
    return "\n".join(lines) + "\n"


def write_report(spec: Spec, out: str | os.PathLike, grid: Sequence[Job] | None = None) -> dict[str, Any]:
    """``summary.json``, ``table.txt`` and ``plot.png`` in ``out`` from the runs finished so far."""
    from .report import plot

    out = Path(out)
    grid = plan(spec, out) if grid is None else grid
    summary = summarize(spec, grid)
    summary["counts"] = {"grid": len(grid), "done": sum(j.done() for j in grid),
                         "skipped": sum(j.skip is not None for j in grid)}
    table = format_tables(summary, spec.tasks)
    summary["table"] = table
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "table.txt", table)
    rows = [{"task": f"{e['task']} ({e['setting']})", "k_shot": e["k_shot"], "method": e["label"],
             "trainable_params": e["trainable_params"], "score_mean": e["mean"], "score_std": e["std"],
             "main_metric": e["main_metric"]} for e in summary["entries"] if e.get("trainable_params") is not None]
    if rows:
        plot(rows, out / "plot.png")
    return summary

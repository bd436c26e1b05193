"""Domain- and task-adaptive pretraining before fine-tuning: DAPT, TAPT and DAPT+TAPT.

Gururangan et al. 2020 ("Don't Stop Pretraining", Sections 3-5): continue masked-LM pretraining of the
base model on unlabelled text of the task's domain (DAPT), then on the task's own training text (TAPT),
then fine-tune. ``adapted_model`` runs those stages with :func:`~unipelt.train.pretrain.run_mlm` and
returns the folder of the adapted model, which the trainer then loads as its base.

Each stage's output is cached under a key made of everything that decides it: the base model (or the
previous stage's key), the text's content, and the pretraining settings. The pretraining seed is fixed
(not the run's seed), so three fine-tuning seeds share one TAPT model at full data, as in the paper, and a
sweep pretrains each model once however many methods and seeds use it. A file lock lets several sweep
workers wait for one another instead of pretraining the same model twice.

Defaults follow the paper's TAPT recipe (Appendix B, Table 13): 100 epochs, batch 256, learning rate 1e-4,
6% warm-up, masking 15%. Its DAPT ran 12.5K steps of batch 2048 over gigabytes of text; an offline
corpus here is a few MB, so DAPT uses the TAPT recipe with ``dapt_epochs`` passes over it. ``max_steps``
caps either stage (a TAPT over IMDB's 20K reviews at 100 epochs would be 10K steps).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..serialization import atomic_write_text
from .pretrain import MARKER_FILE, run_mlm

PRETRAIN_SEED = 0  # one adapted model for all fine-tuning seeds


@dataclass(frozen=True)
class AdaptiveSettings:
    """Masked-LM settings of the DAPT and TAPT stages (the paper's TAPT recipe by default)."""

    tapt_epochs: float = 100.0
    dapt_epochs: float = 10.0
    max_steps: int | None = None  # a cap on each stage's steps
    lr: float = 1e-4
    batch_size: int = 256
    max_length: int = 128
    warmup_ratio: float = 0.06
    mlm_probability: float = 0.15

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> AdaptiveSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown pretraining option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where adapted models live: ``explicit``, else ``$UNIPELT_CACHE/pretrained``, else
    ``~/.cache/unipelt/pretrained``."""
    if explicit is not None:
        return Path(explicit)
    root = os.environ.get("UNIPELT_CACHE") or Path.home() / ".cache" / "unipelt"
    return Path(root) / "pretrained"


def _model_identity(model: str) -> str:
    """A local folder by its config and the sizes of its weight files (a changed model gets a new key);
    a Hub name by itself."""
    folder = Path(model)
    if not folder.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".json", ".safetensors", ".bin") and path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(str(path.stat().st_size).encode())
            if path.suffix == ".json" and path.stat().st_size < 1 << 20:
                digest.update(path.read_bytes())
    return f"{folder.resolve()}#{digest.hexdigest()[:16]}"


def _text_digest(lines: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def one_line(text: str) -> str:
    """A text as one line of a pretraining file (the MLM reader takes one document per line)."""
    return " ".join(text.split())


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage(stage: str, base: str, base_key: str, lines: list[str], source: str, epochs: float,
           settings: AdaptiveSettings, cache: Path, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Pretrain ``base`` on ``lines`` once; later calls with the same inputs return the cached model."""
    spec = {"stage": stage, "base": base_key, "text": _text_digest(lines), "epochs": epochs,
            "settings": asdict(settings), "seed": PRETRAIN_SEED}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    out = cache / f"{stage}-{key}"
    record = {"stage": stage, "text": source, "lines": len(lines), "key": key, "path": str(out)}
    with _locked(cache / f".{stage}-{key}.lock"):
        if (out / MARKER_FILE).exists():
            meta = json.loads((out / MARKER_FILE).read_text())
            log(f"{stage}: cached model {out}")
            return {**record, "steps": meta["steps"], "wall_time_s": meta["train_wall_time_s"], "cached": True,
                    "initial_loss": meta["initial_loss"], "final_loss": meta["final_loss"]}
        text_file = cache / f".{stage}-{key}.txt"
        atomic_write_text(text_file, "\n".join(lines) + "\n")
        try:
            result = run_mlm([text_file], out, model=base, epochs=epochs, step_cap=settings.max_steps,
                             lr=settings.lr, batch_size=settings.batch_size, max_length=settings.max_length,
                             seed=PRETRAIN_SEED, mlm_probability=settings.mlm_probability, device=device,
                             warmup_ratio=settings.warmup_ratio, log=log)
        finally:
            text_file.unlink(missing_ok=True)
        atomic_write_text(out / "adaptive.json", json.dumps({**spec, "source": source}, indent=2) + "\n")
    meta = json.loads((out / MARKER_FILE).read_text())
    return {**record, "steps": result["steps"], "wall_time_s": meta["train_wall_time_s"], "cached": False,
            "initial_loss": result["initial_loss"], "final_loss": result["final_loss"]}


def adapted_model(model: str, dapt_files: Sequence[str | os.PathLike], tapt_texts: Sequence[str] | None,
                  settings: AdaptiveSettings | None = None, cache: str | os.PathLike | None = None,
                  device: str = "cpu", log: Callable[[str], None] = print) -> tuple[str, list[dict[str, Any]]]:
    """Pretrain ``model`` on the domain text (``dapt_files``, if any), then on the task text (``tapt_texts``,
    if given); returns the adapted model's folder and one record per stage (text, lines, steps, time, path,
    cached). With neither, ``model`` comes back unchanged."""
    from .pretrain import read_lines

    settings = settings or AdaptiveSettings()
    folder = cache_dir(cache)
    stages: list[dict[str, Any]] = []
    current, current_key = model, _model_identity(model)
    if dapt_files:
        try:
            lines = read_lines(list(dapt_files))
        except ValueError as e:
            raise ConfigError(f"--dapt: {e}") from e
        record = _stage("dapt", current, current_key, lines, ", ".join(str(f) for f in dapt_files),
                        settings.dapt_epochs, settings, folder, device, log)
        stages.append(record)
        current, current_key = record["path"], record["key"]
    if tapt_texts is not None:
        lines = [line for line in (one_line(t) for t in tapt_texts) if line]
        if not lines:
            raise ConfigError("--tapt: the task's training split has no text to pretrain on")
        record = _stage("tapt", current, current_key, lines, "task train text", settings.tapt_epochs, settings,
                        folder, device, log)
        stages.append(record)
        current = record["path"]
    return current, stages

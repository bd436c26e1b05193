"""One training loop for CPU, one GPU or several (through ``accelerate``), and evaluation of saved runs.

``run(RunConfig(...))`` loads the task and the model, attaches the method (or trains everything for
``method="full"``), trains with AdamW and a linear warm-up/decay schedule, evaluates on a
validation sample every ``eval_every`` steps with early stopping, and writes into ``out``:

- ``run.json``: the run's settings (what ``unipelt eval`` and ``--resume`` read);
- ``delta.safetensors`` + ``unipelt.json`` (the best delta), or ``model/`` for full fine-tuning;
- ``checkpoint.pt``: everything needed to resume (written atomically after each evaluation);
- ``results.json``: task, method, model, seed, k, scores on the report split, trainable
  parameters, wall time, peak memory and speed.

Low-resource runs follow UniPELT's protocol: K training and K validation examples are sampled from
``train`` per seed and the report split is ``dev``. Data order comes from seeded generators and the
checkpoint carries the random states, so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import core, serialization, sharded
from ..config import ConfigError, parse_config
from ..models import DEFAULT_MODEL, load_model
from ..serialization import atomic_write_text
from ..tasks import Task, TaskDataError, get_task, hold_out, k_shot
from ..tasks.multitask import MultiTask

# The trainer's learning rates for methods whose config names no ``reference_lr`` (the rate of its reference
# recipe, which comes first: Compacter 3e-3, AdapterBias 1e-4, SparseAdapter 1e-4, Poly 1e-3 with its routing
# at 0.1, ATTEMPT 0.3, RAFT 5e-3 with its coefficients at 1e-3). These come from the low-resource GLUE runs on
# MiniLM (benchmarks/results/glue_lowres) and the methods' papers; UniPELT 1e-3 over 2e-3 on SST-2 and STS-B at
# K=100 (benchmarks/results/recipe_sweep). --lr overrides either.
DEFAULT_LR = {
    "full": 5e-5, "lora": 2e-3, "adapter": 2e-3, "houlsby": 2e-3, "pfeiffer": 2e-3, "parallel": 2e-3,
    "scaled_parallel": 1e-3, "prefix": 2e-4, "prompt": 3e-2, "bitfit": 1e-3, "ia3": 3e-3, "ln": 1e-3,
    "unipelt": 1e-3, "unipelt_legacy": 1e-3, "mam": 5e-4, "mam_glue": 1e-4, "composition": 1e-3,
    # KronA (no reference code) and KAdaptation (its reference sweeps 1e-6 to 1e-1 per dataset): ours
    "krona": 1e-3, "krona_ffn": 1e-3, "kadaptation": 1e-3, "vpt": 5e-2, "vpt_deep": 5e-2,
}
# parts trained at a fraction of the run's rate unless --part-lr says otherwise (unipelt_legacy's prefix: a tenth)
DEFAULT_PART_LR = {"unipelt_legacy": {"prefix": 0.1}}
RUN_FILE, RESULTS_FILE, CHECKPOINT_FILE = "run.json", "results.json", "checkpoint.pt"
LOCK_FILE = ".lock"  # held while a run writes into its folder
# 2: loadable with torch.load(weights_only=True) (config as plain JSON values); 1 (untagged) needed unpickling
CHECKPOINT_FORMAT = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class RunConfig:
    task: str
    method: str = "unipelt"
    model: str | None = None
    k_shot: int | None = None
    seed: int = 1
    epochs: float = 20.0
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int | None = None  # None: the task's (128; SQuAD 384)
    data_dir: str | None = None
    out: str = "out/run"
    device: str | None = None
    eval_every: int | None = None
    patience: int = 10
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    method_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    report_split: str | None = None  # None: the task's (GLUE dev; the DAPT tasks and SQuAD's re-split test)
    progress: bool = True
    part_lr: dict[str, float] = field(default_factory=dict)  # method name -> its own learning rate
    # torch.compile mode for the training forward and backward ("default", "reduce-overhead" = with CUDA
    # graphs, "max-autotune"), or None for eager. At small batches a GPU step is bound by the CPU launching
    # kernels; compiled, it is bound by the kernels (benchmarks/results/speed).
    compile: str | None = None
    # few-shot adaptation from a Poly inventory: the saved multi-task delta, a new routing row for this task
    from_inventory: str | None = None
    routing_only: bool = False  # with from_inventory: train the new routing row (and head) only
    # DAPT / TAPT (Gururangan et al. 2020): masked-LM pretraining on these domain text files, then on the
    # task's training text, before fine-tuning; adapted models are cached by their inputs (train/adaptive.py)
    dapt: list[str] = field(default_factory=list)
    tapt: bool = False
    pretrain_options: dict[str, Any] = field(default_factory=dict)  # AdaptiveSettings fields
    pretrain_cache: str | None = None
    save: bool = True  # False: keep results.json only (no delta or model, the checkpoint removed at the end)
    label: str | None = None  # the row name in reports; None: the method, prefixed by dapt/tapt
    # shard the model with FSDP2 across the launched processes (each transformer layer a group) instead of
    # DDP's whole copy per process; `accelerate launch` with an FSDP2 config gets the same handling
    fsdp: bool = False


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's fused update (one kernel per dtype) where every trainable tensor is on a GPU: a PEFT method has
    many small tensors (UniPELT on BERT-base 197), whose per-tensor host work the multi-tensor default
    pays every step (compiled UniPELT step on an H100: 11.08 -> 10.22 ms, docs/findings.md)."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def default_lr(method: str, method_cfg: Any) -> float:
    """The learning rate a run of ``method`` takes when ``--lr`` is not given: the method config's
    ``reference_lr`` (its reference recipe's), else the trainer's table ``DEFAULT_LR``, else 5e-4."""
    reference = getattr(method_cfg, "reference_lr", None)
    return reference if reference is not None else DEFAULT_LR.get(method, 5e-4)


def parameter_groups(model: torch.nn.Module, lr: float, part_lr: dict[str, float]) -> tuple[list[dict], dict]:
    """Optimizer groups: each attached method named in ``part_lr`` at its own rate, the rest at ``lr``.

    UniPELT's reference trains every part at one rate (``run_glue.py`` passes one learning rate to the Trainer),
    as the trainer does by default; ``part_lr={"prefix": 1e-4}`` gives a part its own. A method whose reference
    trains some of its parameters at their own rate (Poly's routing logits) says so in ``rate_groups()``:
    ``{"routing": (params, 0.1)}``; ``part_lr={"poly.routing": 0.05}`` overrides such a rate.
    """
    taken: set[int] = set()
    groups, by_part = [], {}
    own_groups = set()
    for name, method in core.deltas(model).items():
        kind = method.config.method
        for group, (params, rate) in (method.rate_groups() if hasattr(method, "rate_groups") else {}).items():
            key = f"{kind}.{group}"
            own_groups.add(key)
            own = [p for p in params if p.requires_grad and id(p) not in taken]
            taken.update(id(p) for p in own)
            if own:
                groups.append({"params": own, "lr": part_lr.get(key, rate)})
                by_part[f"{name}.{group}"] = part_lr.get(key, rate)
        if kind in part_lr:
            own = [p for p in method.parameters() if p.requires_grad and id(p) not in taken]
            taken.update(id(p) for p in own)
            groups.append({"params": own, "lr": part_lr[kind]})
            by_part[name] = part_lr[kind]
    unknown = sorted(set(part_lr) - {m.config.method for m in core.deltas(model).values()} - own_groups)
    if unknown:
        raise ConfigError(f"--part-lr names {unknown}, which this run does not attach")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return [g for g in [{"params": rest, "lr": lr}, *groups] if g["params"]], by_part


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compiled(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """``model`` through ``torch.compile`` in ``mode`` (None: ``model`` itself). Hooks of attached methods are
    traced into the graph; the parameters stay the model's, so saving and evaluation use ``model``."""
    if mode is None:
        return model
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=None if mode == "default" else mode)


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no GPU is visible; use --device cpu")
    return name


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from ..models import default_model_path

    target = model or default_model_path()
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                       "sentencepiece.bpe.model", "tokenizer.model")
    if os.path.isdir(target) and not any(os.path.exists(os.path.join(target, f)) for f in tokenizer_files):
        # transformers 5 would build an empty tokenizer here rather than fail
        raise ConfigError(f"model folder {target} has no tokenizer files ({', '.join(tokenizer_files[:3])}, ...); "
                          f"save one beside the model with tokenizer.save_pretrained, or pick another --model")
    try:
        tok = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model {target!r} has no tokenizer that loads ({type(e).__name__}); save one beside the "
                          f"model (tokenizer.save_pretrained) or pick another --model") from e
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"model {target!r} has a slow tokenizer; unipelt needs a fast one (tokenizer.json)")
    return tok


def preprocessor(task: Task, model: str | None):
    """What turns the task's examples into model inputs: the model's tokenizer, or for image tasks its
    image preprocessing."""
    return task.preprocessor(model) if getattr(task, "uses_images", False) else load_tokenizer(model)


def prune_sparse_adapters(model: torch.nn.Module, train_feats: Any, pad_id: int, cfg: RunConfig,
                          examples: int = 320) -> None:
    """SparseAdapter's SNIP pruning at initialisation, on ``examples`` seeded training examples (all of them
    when fewer) in batches of the run's size: 320, the reference's (SparseAdapter
    ``src/transformers/trainer_sparse.py``: ``args.length * 32``, ``length`` 10 by default).

    Deterministic for a seed: a resumed run recomputes the same masks before its checkpoint is loaded.
    """
    from ..methods.sparse_adapter import snip_prune, sparse_adapters

    if not sparse_adapters(model):
        return
    order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(cfg.seed))
    picked = order[:examples].tolist()
    snip_prune(model, [collate([train_feats.rows[i] for i in picked[j:j + cfg.batch_size]], pad_id)
                       for j in range(0, len(picked), cfg.batch_size)])


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of rows into a batch: ids with ``pad_id``, labels of token tasks with -100, the rest 0;
    scalars and images (same shape in every row) are stacked."""
    batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if values[0].dim() != 1:
            batch[key] = torch.stack(values)
            continue
        fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
        width = max(v.shape[0] for v in values)
        out = torch.full((len(values), width), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            out[i, :v.shape[0]] = v
        batch[key] = out
    return batch


def make_predict(model: torch.nn.Module, pad_id: int, batch_size: int, device: str, autocast):
    """``predict(rows) -> {"logits"| "start_logits"| "end_logits": tensor}``, concatenated over batches.

    Sequence-shaped outputs are padded with zeros to the longest row; rows keep their order.
    """
    def predict(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                batch = collate(rows[i:i + batch_size], pad_id)
                inputs = {k: v.to(device) for k, v in batch.items()
                          if k not in ("labels", "start_positions", "end_positions")}
                with autocast():
                    out = model(**inputs)
                for key in ("logits", "start_logits", "end_logits"):
                    value = out.get(key) if hasattr(out, "get") else None
                    if value is not None:
                        parts.setdefault(key, []).append(value.float().cpu())
        result = {}
        for key, chunks in parts.items():
            if chunks[0].dim() >= 2:  # per-token outputs differ in length between batches
                width = max(c.shape[1] for c in chunks)
                chunks = [torch.nn.functional.pad(c, (0, 0) * (c.dim() - 2) + (0, width - c.shape[1])) for c in chunks]
            result[key] = torch.cat(chunks)
        return result

    return predict


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole (under FSDP a collective: every process calls it)."""
    return {n: sharded.whole(p.detach()).to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's resume state, read with ``weights_only=True``: tensors, numbers, strings and containers only, so a
    crafted file runs no code. Files of another format (older unipelt, or not ours) are refused, never unpickled."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for a foreign object, RuntimeError/EOFError for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} cannot be read safely as a unipelt checkpoint ({reason[:160]}); it was written by "
                          f"an older unipelt, is damaged, or is not ours: delete it and start the run again "
                          f"without --resume") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a unipelt checkpoint of format {CHECKPOINT_FORMAT} (an older unipelt wrote "
                          f"it, or another program); delete it and start the run again without --resume")
    return ckpt


def _sharding(model: torch.nn.Module, full: bool) -> str | None:
    """``"fsdp2"`` when FSDP2 holds ``model`` in shards (``--fsdp``, or ``accelerate launch`` with an FSDP2
    config), None when not sharded; a one-line error for the sharding the loop cannot train under."""
    how = sharded.kind(model)
    if how == "fsdp1":
        raise ConfigError("unipelt train shards with FSDP2, not FSDP1: set fsdp_version: 2 in the accelerate "
                          "config, or pass --fsdp instead of an FSDP config")
    if how == "zero3":
        raise ConfigError("unipelt train does not train under DeepSpeed: launch it with --fsdp (FSDP2) or DDP; "
                          "a ZeRO-3 loop of your own saves the delta whole with unipelt.save (docs/training.md)")
    if how is not None and full:
        raise ConfigError("unipelt train shards a delta's training, not full fine-tuning: launch that without "
                          "FSDP (DDP)")
    return how


def _atomic_torch_save(obj: Any, path: Path) -> None:
    serialization._atomic_write(path, lambda tmp: torch.save(obj, tmp))


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def method_config(method: str, options: dict[str, Any]):
    """The method's config from its name and ``--set``/config-file options (``full``: None)."""
    if method == "full":
        if options:
            raise ConfigError("--method full takes no method options")
        return None
    return parse_config({**options, "method": method})


@dataclass
class _Prepared:
    cfg: RunConfig  # with the task's defaults filled in
    task: Task
    train: list
    val: list
    report: list
    tokenizer: Any
    model: torch.nn.Module
    method_cfg: Any
    model_kwargs: dict[str, Any]
    model_path: str | None  # what the model was loaded from: cfg.model, or the DAPT/TAPT-adapted folder
    pretraining: list[dict[str, Any]]


def run_label(cfg: RunConfig) -> str:
    """The run's name in reports: ``cfg.label``, else the method with its pretraining stages in front
    (``full`` after DAPT and TAPT is ``dapt+tapt``; UniPELT after TAPT is ``tapt+unipelt``)."""
    if cfg.label:
        return cfg.label
    stages = [name for name, on in (("dapt", bool(cfg.dapt)), ("tapt", cfg.tapt)) if on]
    if not stages:
        return cfg.method
    return "+".join(stages if cfg.method == "full" else [*stages, cfg.method])


def _with_task_defaults(cfg: RunConfig, task: Task) -> RunConfig:
    from dataclasses import replace

    return replace(cfg, max_length=cfg.max_length or getattr(task, "max_length", 128),
                   report_split=cfg.report_split or task.default_report_split(cfg.data_dir))


def _adapt(cfg: RunConfig, task: Task, full_train: list, train: list) -> tuple[str | None, list[dict[str, Any]]]:
    """The DAPT/TAPT-adapted base model (``cfg.model`` when neither is asked for). TAPT reads the whole
    training split at full data (unlabelled text, as in the paper) and only the K sampled examples at K-shot."""
    if not cfg.dapt and not cfg.tapt:
        return cfg.model, []
    from ..models import default_model_path
    from .adaptive import AdaptiveSettings, adapted_model

    texts = None
    if cfg.tapt:
        try:
            texts = task.texts(full_train if cfg.k_shot is None else train)
        except NotImplementedError as e:
            raise ConfigError(f"--tapt: {e}") from e
    settings = AdaptiveSettings.from_options(dict(cfg.pretrain_options))
    return adapted_model(cfg.model or default_model_path(), cfg.dapt, texts, settings, cfg.pretrain_cache,
                         device=_device(cfg.device))


def adapt_from_inventory(model: torch.nn.Module, cfg: RunConfig) -> Any:
    """Load a Poly inventory trained on other tasks, add this task's routing row (its default), and freeze
    the inventory when ``routing_only``; the task head starts fresh. Returns the method's config."""
    from ..methods.poly import Poly

    meta = serialization.read_meta(cfg.from_inventory)
    kinds = [m["config"]["method"] for m in meta["methods"]]
    if kinds != ["poly"]:
        raise ConfigError(f"--from-inventory takes a delta of one Poly method (poly, poly_s, poly_mu); "
                          f"{cfg.from_inventory} holds {kinds}")
    serialization.load(model, cfg.from_inventory, heads=False)
    poly = next(m for m in core.deltas(model).values() if isinstance(m, Poly))
    poly.add_task()
    if cfg.routing_only:
        poly.train_routing_only()
    return poly.config


def routed_method(method_cfg: Any, task: Any, cfg: RunConfig) -> Any:
    """Training several tasks at once needs a method that routes rows by task (Poly's routing rows, ATTEMPT's
    target prompts); it gets one task each."""
    from dataclasses import replace

    from ..methods.attempt import AttemptConfig
    from ..methods.poly import PolyConfig

    if not isinstance(method_cfg, (PolyConfig, AttemptConfig)):
        raise ConfigError(f"training several tasks at once ({task.name}) routes each row by its task: use --method "
                          f"poly, poly_s, poly_mu or attempt, or train the tasks one by one")
    n = len(task.tasks)
    if "tasks" in cfg.method_options and method_cfg.tasks != n:
        raise ConfigError(f"--set tasks={method_cfg.tasks} but --task names {n} tasks")
    return replace(method_cfg, tasks=n)


def _prepare(cfg: RunConfig) -> _Prepared:
    """Everything that can fail on bad input, before anything is written (but adapted models, cached)."""
    task = get_task(cfg.task)
    cfg = _with_task_defaults(cfg, task)
    method_cfg = method_config(cfg.method, cfg.method_options)
    full_train = task.load("train", cfg.data_dir)
    if isinstance(task, MultiTask):  # several tasks: K (or a hold-out) per task, and a routed method
        method_cfg = routed_method(method_cfg, task, cfg)
        train, val = task.sample(full_train, cfg.k_shot, cfg.seed)
    elif cfg.k_shot is not None:
        train, val = k_shot(full_train, cfg.k_shot, cfg.seed)
    else:
        train, val = hold_out(full_train, cfg.seed)
    if not train or not val:
        raise TaskDataError("no training or validation examples after sampling; check --k-shot and the data")
    report = task.load(cfg.report_split, cfg.data_dir)
    if not report:
        raise TaskDataError(f"the {cfg.report_split} split of {cfg.task} is empty")
    model_path, pretraining = _adapt(cfg, task, full_train, train)
    tokenizer = preprocessor(task, model_path)
    set_seed(cfg.seed)
    model_kwargs = task.model_kwargs(full_train)
    model = load_model(model_path, task.auto_model_class(), **model_kwargs)
    if cfg.from_inventory is not None:
        method_cfg = adapt_from_inventory(model, cfg)
    elif method_cfg is not None:
        core.attach(model, method_cfg)
    return _Prepared(cfg, task, train, val, report, tokenizer, model, method_cfg, model_kwargs, model_path,
                     pretraining)


def _check_out(out: Path, resume: bool) -> None:
    if resume:
        return
    if (out / RESULTS_FILE).exists():
        raise ConfigError(f"{out} already holds a finished run; choose another --out (nothing was overwritten)")
    if (out / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{out} holds an interrupted run; pass --resume to continue it, or choose another --out")


@contextlib.contextmanager
def exclusive_folder(out: Path, what: str = "run") -> Iterator[None]:
    """Hold ``out/.lock`` while a run (or a sweep) writes into ``out``, so that a second one started on the same
    ``--out`` refuses instead of writing over the first's files. Only the main process locks (``accelerate``
    starts one ``run`` per process). A run that fails before writing anything leaves no folder behind."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / LOCK_FILE
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another unipelt {what} is writing into {out}; wait for it to end (then --resume if it "
                              f"was stopped) or choose another --out") from None
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed and created and {f.name for f in out.iterdir()} == {LOCK_FILE}:
                lock_path.unlink()
                out.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(cfg: RunConfig, log=print) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.task`` and write the run into ``cfg.out``; returns the results."""
    out = Path(cfg.out)
    with exclusive_folder(out):
        return _run(cfg, out, log)


def _run(cfg: RunConfig, out: Path, log) -> dict[str, Any]:
    if cfg.fsdp and cfg.method == "full":
        raise ConfigError("--fsdp shards a delta's training; full fine-tuning runs on one process or under DDP: "
                          "drop --fsdp")
    _check_out(out, cfg.resume)
    device = _device(cfg.device)
    prep = _prepare(cfg)
    cfg = prep.cfg
    model, task, tok = prep.model, prep.task, prep.tokenizer
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.method, prep.method_cfg)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)

    from accelerate import Accelerator

    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    # Each process takes a slice of every batch (below), so the schedule advances once per step; accelerate's
    # default would step it once per process and finish the warm-up and decay early.
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
    device = str(accelerator.device)
    main = accelerator.is_main_process

    train_feats = task.featurize(prep.train, tok, cfg.max_length)
    val_feats = task.featurize(prep.val, tok, cfg.max_length)
    report_feats = task.featurize(prep.report, tok, cfg.max_length)
    steps_per_epoch = max(1, math.ceil(len(train_feats) / cfg.batch_size))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    prune_sparse_adapters(model, train_feats, pad_id, cfg)
    own_shards = cfg.fsdp and accelerator.num_processes > 1
    if own_shards:  # before the optimizer: FSDP2 replaces the parameters with their shards
        sharded.shard(model.to(accelerator.device))
    params = [p for p in model.parameters() if p.requires_grad]
    part_lr = dict(cfg.part_lr) or {part: lr * f for part, f in DEFAULT_PART_LR.get(cfg.method, {}).items()}
    groups, lr_by_part = parameter_groups(model, lr, part_lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, **adamw_implementation(params))
    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if own_shards:  # FSDP2 already spreads the model: accelerate would wrap it in DDP as well
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    bare = accelerator.unwrap_model(model)
    sharding = _sharding(bare, prep.method_cfg is None)
    if sharding:  # accelerate's FSDP2 swaps the parameters for their shards in prepare: clip those
        params = [p for p in bare.parameters() if p.requires_grad]
    # only training steps run compiled: evaluation (no grad, other batch sizes) would compile again
    step_model = compiled(model, cfg.compile)
    predict = make_predict(model, pad_id, cfg.eval_batch_size, device, accelerator.autocast)
    higher = task.greater_is_better

    state = {"step": 0, "best": None, "best_step": 0, "bad_evals": 0, "history": []}
    best_weights = _trainable_state(bare)
    resumed_at = None
    if cfg.resume and (out / CHECKPOINT_FILE).exists():
        ckpt = read_checkpoint(out / CHECKPOINT_FILE)
        if ckpt["config"]["task"] != cfg.task or ckpt["config"]["method"] != cfg.method:
            raise ConfigError(f"{out / CHECKPOINT_FILE} belongs to {ckpt['config']['task']}/{ckpt['config']['method']}"
                              f", not {cfg.task}/{cfg.method}")
        sharded.load_whole(bare, ckpt["weights"])
        if sharding:
            sharded.load_full_optimizer_state(optimizer.optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        best_weights = ckpt["best_weights"]
        random.setstate(ckpt["rng"]["python"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        resumed_at = state["step"]
        log(f"resuming {out} at step {state['step']} of {total_steps}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        run_info = {"config": asdict(cfg), "model": cfg.model or DEFAULT_MODEL, "model_path": prep.model_path,
                    "model_kwargs": prep.model_kwargs, "lr": lr, "device": device}
        atomic_write_text(out / RUN_FILE, json.dumps(run_info, indent=2, default=str) + "\n")

    def checkpoint() -> None:
        if not (main or sharding):
            return
        # under FSDP every process gathers the whole weights and optimizer state (collectives); rank 0 writes
        weights = _trainable_state(bare)
        optimizer_state = sharded.full_optimizer_state(optimizer.optimizer) if sharding else \
            optimizer.state_dict()
        if not main:
            return
        # training seconds so far, so that a resumed run reports its whole training time, not its last part
        state["train_seconds"] = trained_before + (time.perf_counter() - start)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        _atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": json.loads(json.dumps(asdict(cfg), default=str)),
                            "weights": weights, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                            "state": state, "best_weights": best_weights, "rng": rng}, out / CHECKPOINT_FILE)

    def validate() -> float:
        metrics = task.score(bare, val_feats, prep.val, predict)
        return metrics[task.main_metric]

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], desc=f"{cfg.task}/{cfg.method}", unit="step",
               disable=not (main and cfg.progress), file=sys.stderr, dynamic_ncols=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    # a resumed run counts what trained before its checkpoint (the steps after it, lost with the kill, ran again)
    trained_before = float(state.get("train_seconds", 0.0))
    start = time.perf_counter()
    stopped_early = False
    while state["step"] < total_steps and not stopped_early:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        model.train()
        for b in range(offset, steps_per_epoch):
            if state["step"] >= total_steps:
                break
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
            idx = idx[rank::world] or idx[:1]
            batch = {k: v.to(device) for k, v in collate([train_feats.rows[i] for i in idx], pad_id).items()}
            with accelerator.autocast():
                loss = step_model(**batch).loss
            finite = torch.isfinite(loss.detach()).reshape(1)
            if world > 1:  # every process stops together, or the others would wait for it forever
                finite = accelerator.gather(finite).all()
            if not finite.all():
                kept = f"the last good checkpoint is {out / CHECKPOINT_FILE}" if (out / CHECKPOINT_FILE).exists() \
                    else "no checkpoint was written yet"
                raise TrainingDiverged(f"the loss became {loss.item()} at step {state['step'] + 1}; {kept}; "
                                       f"lower --lr (now {lr:g}) or turn off mixed precision")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                score = validate()
                state["history"].append({"step": state["step"], "validation": score, "loss": loss.item()})
                better = state["best"] is None or (score > state["best"] if higher else score < state["best"])
                if better:
                    state.update(best=score, best_step=state["step"], bad_evals=0)
                    best_weights = _trainable_state(bare)
                else:
                    state["bad_evals"] += 1
                bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{score:.4f}", best=f"{state['best']:.4f}")
                checkpoint()
                model.train()
                if state["bad_evals"] >= cfg.patience:
                    stopped_early = True
                    break
    bar.close()
    segment_time = time.perf_counter() - start
    train_time = trained_before + segment_time

    sharded.load_whole(bare, best_weights)
    report_metrics = task.score(bare, report_feats, prep.report, predict)
    counts = core.trainable_parameters(bare) if prep.method_cfg is not None else \
        {"total": sum(p.numel() for p in bare.parameters())}
    results = {
        "task": cfg.task, "method": cfg.method, "label": run_label(cfg), "model": cfg.model or DEFAULT_MODEL,
        "seed": cfg.seed,
        "k_shot": cfg.k_shot, "split": cfg.report_split, "main_metric": task.main_metric,
        "score": report_metrics[task.main_metric], "metrics": report_metrics,
        "validation": {"best": state["best"], "best_step": state["best_step"], "history": state["history"]},
        "trainable_params": counts["total"], "trainable_by_part": counts,
        "total_params": sum(p.numel() for p in bare.parameters()),
        "steps": state["step"], "stopped_early": stopped_early, "lr": lr, "lr_by_part": lr_by_part,
        "batch_size": cfg.batch_size, "processes": world, "sharding": sharding,
        # over the whole run: a run resumed at its last checkpoint trains no step here, yet ran at a rate
        "wall_time_s": train_time, "steps_per_s": state["step"] / train_time if train_time > 0 else 0.0,
        "resumed_at_step": resumed_at,
        "peak_memory_mb": peak_memory_mb(device), "device": device, "cpu_threads": torch.get_num_threads(),
        "train_examples": len(prep.train),
        "validation_examples": len(prep.val), "report_examples": len(prep.report),
        "max_length": cfg.max_length, "pretraining": prep.pretraining,
    }
    # under FSDP every process gathers the whole delta (collectives) and rank 0 writes; otherwise rank 0 alone
    if cfg.save and (main or sharding):
        if prep.method_cfg is not None:
            serialization.save(bare, out)
        else:  # full fine-tuning, never sharded here (_sharding)
            _save_full(bare, tok, out / "model")
    if main:
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        if not cfg.save:  # the results are written: the resume state is no longer needed
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)
        log(format_results(results))
    return results


def _save_full(model: torch.nn.Module, tok: Any, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            kept = "the previous model there is intact" if target.exists() else "nothing was saved"
            raise serialization.DeltaFileError(f"could not write the model into {target} ({error.strerror or error}); "
                                               f"{kept}; free space, then run again with --resume") from error
        raise
    if target.exists():
        old = target.with_name(target.name + ".old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def format_results(results: dict[str, Any]) -> str:
    k = results["k_shot"] if results["k_shot"] is not None else "full"
    lines = [f"{results['task']} / {results['method']} / k={k} / seed {results['seed']} "
             f"({results['split']}, {results['report_examples']} examples)"]
    for name, value in results["metrics"].items():
        mark = " *" if name == results["main_metric"] else ""
        lines.append(f"  {name:<14} {value:.4f}{mark}")
    lines.append(f"  {'trainable':<14} {results['trainable_params']:,}")
    lines.append(f"  {'steps':<14} {results['steps']} ({results['steps_per_s']:.2f}/s, "
                 f"{results['wall_time_s']:.0f} s, peak {results['peak_memory_mb']:.0f} MB)")
    return "\n".join(lines)


def evaluate(delta_dir: str | os.PathLike, split: str | None = None, task_name: str | None = None,
             data_dir: str | None = None, device: str | None = None, batch_size: int = 64) -> dict[str, float]:
    """Score the run saved in ``delta_dir`` on ``split`` of its task (or ``task_name``); no split: the one the
    run reported on."""
    folder = Path(delta_dir)
    info_path = folder / RUN_FILE
    if not info_path.exists():
        raise ConfigError(f"{folder} holds no {RUN_FILE}; pass the --out folder of a finished 'unipelt train'")
    info = json.loads(info_path.read_text())
    cfg = info["config"]
    if task_name is not None and get_task(task_name).name != get_task(cfg["task"]).name:
        raise ConfigError(f"{folder} was trained on {cfg['task']}, not {task_name}")
    task = get_task(cfg["task"])
    split = split or cfg.get("report_split") or "dev"
    data_dir = data_dir if data_dir is not None else cfg.get("data_dir")
    if hasattr(task, "labels") and task.labels is None and task.kind == "classification":
        task.load("train", data_dir)  # JSONL tasks learn their label set from train
    examples = task.load(split, data_dir)
    dev = _device(device)
    model_path = info.get("model_path")
    # weights the checkpoint lacks (a classifier's pooler on a masked-LM checkpoint) are initialised as in training
    set_seed(cfg["seed"])
    if cfg["method"] == "full":
        model = load_model(str(folder / "model"), task.auto_model_class())
    else:
        model = load_model(model_path, task.auto_model_class(), **info["model_kwargs"])
        serialization.load(model, folder)
    model.to(dev)
    tok = preprocessor(task, model_path if cfg["method"] != "full" else str(folder / "model"))
    feats = task.featurize(examples, tok, cfg.get("max_length") or getattr(task, "max_length", 128))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    from contextlib import nullcontext

    predict = make_predict(model, pad_id, batch_size, dev, nullcontext)
    return task.score(model, feats, examples, predict)

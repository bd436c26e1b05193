"""Continued masked-LM pretraining on in-domain or task text (DAPT / TAPT, Gururangan et al. 2020).

Before fine-tuning a delta on a domain, a few steps of masked-LM training on that domain's raw text
move the base model towards it. ``run_mlm`` does that with BERT's masking and writes a full model
folder (weights, config, tokenizer) that any ``AutoModelFor*.from_pretrained`` then loads as the base
for ``unipelt.attach``. The folder is written beside ``out`` and renamed into place at the end, so a
killed run never leaves a half-written model where a later run would load it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MARKER_FILE = "pretrain.json"
MARKER_KIND = "unipelt-mlm-pretrain"
IGNORE_INDEX = -100


class PretrainingDiverged(RuntimeError):
    """The masked-LM loss became NaN or infinite: the learning rate is likely too high."""


# --------------------------------------------------------------------------------------------- masking


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_token_id: int, vocab_size: int,
                mlm_probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick each ordinary token with ``mlm_probability``; of those 80% -> [MASK], 10% -> a
    random token, 10% kept. Returns ``(masked_ids, labels)``, labels ``-100`` where nothing is predicted.

    ``special_mask`` (bool, same shape) marks tokens never picked: [CLS], [SEP], padding. Keeping the
    10%/10% lets the model see real tokens at predicted positions, so it cannot learn that only [MASK]
    positions matter. When nothing was picked in the whole batch (a short batch, bad luck), one eligible
    token is picked, so the loss is always defined. Random draws all come from ``generator``: the same
    seed gives the same masks.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if input_ids.shape != special_mask.shape:
        raise ValueError(f"special_mask has shape {tuple(special_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    eligible = ~special_mask.to(torch.bool).cpu()
    ids = input_ids.cpu()
    probs = torch.full(ids.shape, mlm_probability)
    picked = torch.bernoulli(probs, generator=generator).to(torch.bool) & eligible
    if not picked.any() and eligible.any():
        flat = eligible.flatten().nonzero().flatten()
        choice = flat[torch.randint(len(flat), (1,), generator=generator)]
        picked.view(-1)[choice] = True
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).to(torch.bool) & picked
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).to(torch.bool) & picked & ~to_mask
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    masked = ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked.to(input_ids.device), labels.to(input_ids.device)


# ------------------------------------------------------------------------------------------------ data


def read_lines(text_files: Sequence[str | Path]) -> list[str]:
    """The non-empty lines of every file, in order; a missing file, or one with no text, is a ValueError."""
    if isinstance(text_files, (str, Path)):
        text_files = [text_files]
    if not text_files:
        raise ValueError("no text files given")
    lines: list[str] = []
    for f in text_files:
        path = Path(f)
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read text file {path}: {e}") from e
        found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise ValueError(f"text file {path} is empty (no non-blank lines)")
        lines += found
    return lines


def tokenize_lines(lines: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids with special tokens, one sequence per line; a line longer than ``max_length`` becomes
    several sequences, so a long document is split rather than cut off (DAPT text is often long).
    Sequences with nothing but special tokens are dropped: they hold nothing to predict."""
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length - n_special < 1:
        raise ValueError(f"max_length={max_length} leaves no room beside {n_special} special tokens")
    encoded = tokenizer(list(lines), truncation=True, max_length=max_length, return_overflowing_tokens=True)
    special = set(tokenizer.all_special_ids)
    return [list(ids) for ids in encoded["input_ids"] if any(i not in special for i in ids)]


def _collate(sequences: Sequence[list[int]], pad_id: int, special_ids: set[int]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, :len(s)] = 1
    special = (attention == 0) | torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long))
    return {"input_ids": ids, "attention_mask": attention, "special_mask": special}


# ------------------------------------------------------------------------------------------------- out


def _is_previous_output(out: Path) -> bool:
    try:
        return json.loads((out / MARKER_FILE).read_text(encoding="utf-8")).get("kind") == MARKER_KIND
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    """Refuse an ``out`` holding anything but a previous pretrain output: never overwrite someone's files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_output(out):
        raise ValueError(f"output folder {out} is not empty and is not a previous pretrain output "
                         f"(no {MARKER_FILE}); choose another folder or empty it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``; a previous output is moved aside first, then removed."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- run


def _base_only_weights(source: str, mlm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights the checkpoint holds but the masked-LM model has no place for, such as BERT's pooler.

    ``AutoModelForMaskedLM`` drops the pooler, so saving it alone would leave a sequence classifier
    loaded from the output with a random pooler where the base model had a trained one. These weights
    are saved unchanged beside the trained ones. Weights the checkpoint itself lacks are not invented.
    """
    from transformers import AutoModel

    base, info = AutoModel.from_pretrained(source, output_loading_info=True)
    never_loaded = set(info.get("missing_keys", ())) | set(info.get("mismatched_keys", ()))
    have = set(mlm.state_dict())
    prefix = getattr(mlm, "base_model_prefix", "")
    extras = {}
    for key, value in base.state_dict().items():
        full = f"{prefix}.{key}" if prefix else key
        if key in never_loaded or full in have or key in have:
            continue
        extras[full] = value.detach().clone().contiguous()
    del base
    return extras


def _mlm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], masked: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels)
    return out.loss


def _accumulated_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], masked: torch.Tensor,
                      labels: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """The batch's MLM loss (mean over its predicted tokens), back-propagated in slices of ``micro_batch``
    rows: each slice's mean is weighted by its share of the predicted tokens, so the gradient is the whole
    batch's while the vocabulary-wide logits of only one slice are in memory (batch 256 x 128 x 30K would
    be 4 GB per copy). bf16 autocast on a GPU, as the fine-tuning loop does."""
    n_predicted = (labels != IGNORE_INDEX).sum()
    total = torch.zeros((), device=labels.device)
    on_gpu = labels.device.type == "cuda"
    for start in range(0, labels.shape[0], micro_batch):
        rows = slice(start, start + micro_batch)
        share = (labels[rows] != IGNORE_INDEX).sum() / n_predicted
        if share == 0:
            continue
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = _mlm_loss(model, {k: v[rows] for k, v in batch.items()}, masked[rows], labels[rows])
        (loss * share).backward()
        total += loss.detach().float() * share
    return total


def run_mlm(text_files: list[str | Path], out: str | Path, model: str | None = None, epochs: float = 1.0,
            max_steps: int | None = None, lr: float = 5e-5, batch_size: int = 16, max_length: int = 128,
            seed: int = 1, mlm_probability: float = 0.15, device: str = "cpu", warmup_ratio: float = 0.0,
            step_cap: int | None = None, micro_batch: int = 64, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Continue masked-LM pretraining of ``model`` (default: the embedded MiniLM) on ``text_files``.

    One document or sentence per non-empty line. Training runs ``ceil(epochs * batches per epoch)``
    steps, or exactly ``max_steps`` when given (cycling over the data as needed), with AdamW, a linear
    warm-up over ``warmup_ratio`` of the steps (the DAPT paper's 6%) and a linear decay to 0, gradient
    clipping at 1.0 and fresh BERT masks every step (bf16 autocast on a GPU). A
    checkpoint without MLM-head weights (MiniLM ships none) gets a new head, seeded. ``step_cap`` bounds
    the steps whichever way they were set; a batch is processed ``micro_batch`` rows at a time (the same
    gradient, less memory).

    ``initial_loss`` and ``final_loss`` are the MLM loss on one held batch with one fixed mask, before
    and after training, so the two are directly comparable (per-step losses vary with batch and mask).
    The model and its tokenizer go to ``out`` (written beside it, renamed at the end); an ``out`` that
    exists, is not empty and is not a previous pretrain output is a ValueError. A NaN or infinite loss
    raises :class:`PretrainingDiverged` and writes nothing.

    Returns ``{"steps", "final_loss", "initial_loss", "wall_time_s", "out"}``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ..models import default_model_path

    start = time.perf_counter()
    if batch_size < 1 or micro_batch < 1:
        raise ValueError(f"batch_size and micro_batch must be at least 1, got {batch_size} and {micro_batch}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if max_steps is None and not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    out = Path(out)
    _check_out(out)
    lines = read_lines(text_files)
    source = model or default_model_path()

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {source} has no mask or padding token: it cannot do masked-LM")
    sequences = tokenize_lines(lines, tokenizer, max_length)
    if not sequences:
        raise ValueError(f"the text files {[str(f) for f in text_files]} hold no tokens")

    torch.manual_seed(seed)  # a newly initialised MLM head is then reproducible
    mlm = AutoModelForMaskedLM.from_pretrained(source)
    base_only = _base_only_weights(source, mlm)
    mlm.to(device)
    torch.manual_seed(seed)  # and so is dropout
    vocab_size = mlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    special_ids = set(tokenizer.all_special_ids)
    pad_id = tokenizer.pad_token_id

    per_epoch = math.ceil(len(sequences) / batch_size)
    steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * per_epoch))
    if step_cap is not None:  # at most this many, however many epochs asked for
        steps = min(steps, step_cap)
    log(f"pretrain (masked LM): {len(lines)} lines -> {len(sequences)} sequences from {len(text_files)} file(s); "
        f"{steps} steps of batch {batch_size}, lr {lr}; model {source}")

    # One held batch with one fixed mask measures the loss before and after training.
    held = _collate(sequences[:max(min(batch_size, 64), 32)], pad_id, special_ids)
    held_masked, held_labels = mask_tokens(held["input_ids"], held["special_mask"], tokenizer.mask_token_id,
                                           vocab_size, mlm_probability, torch.Generator().manual_seed(seed + 7919))
    held = {k: v.to(device) for k, v in held.items()}
    held_masked, held_labels = held_masked.to(device), held_labels.to(device)

    def held_loss() -> float:
        mlm.eval()
        with torch.no_grad():
            value = float(_mlm_loss(mlm, held, held_masked, held_labels))
        mlm.train()
        return value

    initial_loss = held_loss()
    if not math.isfinite(initial_loss):
        raise PretrainingDiverged(f"the masked-LM loss of {source} is {initial_loss} before any training")

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    params = [p for p in mlm.parameters() if p.requires_grad]
    decay = [p for n, p in mlm.named_parameters() if p.requires_grad and not n.endswith(no_decay)]
    rest = [p for n, p in mlm.named_parameters() if p.requires_grad and n.endswith(no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr)
    warmup = int(warmup_ratio * steps)

    def schedule(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (steps - s) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)

    def batches():
        while True:
            order = torch.randperm(len(sequences), generator=data_gen).tolist()
            for i in range(0, len(order), batch_size):
                yield _collate([sequences[j] for j in order[i:i + batch_size]], pad_id, special_ids)

    mlm.train()
    step_losses: list[float] = []
    stream = batches()
    with tqdm(total=steps, desc="mlm", unit="step", dynamic_ncols=True) as bar:
        for step in range(1, steps + 1):
            batch = next(stream)
            masked, labels = mask_tokens(batch["input_ids"], batch["special_mask"], tokenizer.mask_token_id,
                                         vocab_size, mlm_probability, mask_gen)
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulated_loss(mlm, batch, masked.to(device), labels.to(device), micro_batch)
            if not torch.isfinite(loss):
                raise PretrainingDiverged(f"masked-LM loss is {loss.item()} at step {step}/{steps} (lr {lr}); "
                                          f"lower the learning rate. Nothing was written to {out}")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step_losses.append(loss.item())
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}")
            bar.update(1)

    final_loss = held_loss()
    if not math.isfinite(final_loss):
        raise PretrainingDiverged(f"masked-LM loss is {final_loss} after training (lr {lr}); lower the learning "
                                  f"rate. Nothing was written to {out}")
    train_wall = time.perf_counter() - start

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        state = mlm.state_dict()
        state.update(base_only)
        mlm.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        pooling = Path(source) / "1_Pooling"
        if pooling.is_dir():  # keep the sentence-transformers pooling, so classifiers pool as the base did
            shutil.copytree(pooling, tmp / "1_Pooling")
        meta = {
            "kind": MARKER_KIND, "base_model": str(source), "text_files": [str(f) for f in text_files],
            "lines": len(lines), "sequences": len(sequences), "steps": steps, "epochs": epochs,
            "max_steps": max_steps, "step_cap": step_cap, "lr": lr, "batch_size": batch_size,
            "max_length": max_length, "seed": seed, "mlm_probability": mlm_probability, "warmup_ratio": warmup_ratio,
            "initial_loss": initial_loss, "final_loss": final_loss,
            "step_losses": step_losses, "train_wall_time_s": train_wall,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _check_out(out)  # something may have appeared there while we trained
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    log(f"pretrain: held-batch MLM loss {initial_loss:.4f} -> {final_loss:.4f}; model and tokenizer in {out}")
    return {"steps": steps, "final_loss": final_loss, "initial_loss": initial_loss, "wall_time_s": wall,
            "out": str(out)}

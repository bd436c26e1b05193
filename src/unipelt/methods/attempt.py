"""ATTEMPT (Asai et al. 2022): ``P(x) = P_t + sum_j a_j(x) P_j``, a task's target prompt plus an input-dependent
attention mixture of frozen source prompts and that target prompt.

Reference: AkariAsai/ATTEMPT ``attempt/third_party/models/t5/modeling_t5.py`` (``T5Stack.forward``, attention
``"sub"``), ``attempt/run_seq2seq.py`` (target init) and ``attempt/configs/attempt/*.json`` (prompt length 100,
learning rate 0.3). Source prompts are prompt-tuning deltas trained on source tasks (``unipelt train --method
prompt``, saved as usual). For each input row of task ``t``:

    x = max-pool over the row's real tokens of their embeddings               (d)
    h = LayerNorm(W_up SiLU(W_down x))                                           (d -> m -> d, no biases)
    a = softmax_j( h . max-pool(P_j) / T ),  j over the sources and P_t          (T = d e)
    P(x) = P_t + sum_j a_j P_j

and ``P(x)`` is inserted like a tuned prompt (after [CLS] in BERT-like encoders). Trainable, as the reference's:
the target prompts and ``W_down``, ``W_up``; the LayerNorm has no trained gain or bias (the reference freezes it
at 1 and 0). Each target prompt starts as the first source prompt (``target_init="first_source"``; ``"zero"``
starts from the sources' mixture alone). Multi-task (``tasks`` > 1, ``unipelt train --task a,b,c --method
attempt``): one attention module shared by every task and one target prompt per task, chosen per row by the
call's ``task_ids``, trained on mixed batches (the reference's ``shared_attn``/``multi_task`` mode). The pool
masks the padding out, so a padded row gives what it gives alone; the reference pads every batch to its
maximum length and max-pools over the padding too. The sources are frozen and saved inside the delta
(``n_sources`` in its config), so a saved ATTEMPT delta loads without the source folders. Not mergeable; like
any prompt it changes the output at init. Parameters: ``tasks length d + 2 d m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..registry import register_method
from ..sites import ModelMap
from .prompt import Prompt, PromptConfig

TARGET_INITS = ("first_source", "zero")


@dataclass
class AttemptConfig(PromptConfig):
    method = "attempt"
    description = "ATTEMPT: target prompt + per-input attention over frozen source prompts (saved prompt deltas)"

    reference_lr: ClassVar[float | None] = 0.3  # the reference's configs (learning_rate 3e-1)

    length: int = 100  # the reference's prefix_dim; the sources must be prompts of this length
    sources: tuple[str, ...] = ()  # folders of prompt deltas saved by unipelt (unipelt.save / unipelt train)
    n_sources: int = 0  # how many sources a saved delta holds (set on save; leave at 0 with sources)
    attention_hidden: int = 100
    tasks: int = 1  # target prompts, one per task (task_ids per row); set by --task a,b,c
    target_init: str = "first_source"

    def validate(self) -> None:
        super().validate()
        if not self.sources and self.n_sources < 1:
            raise ConfigError("attempt needs source prompts: sources=('out/mnli-prompt', 'out/qnli-prompt', ...), "
                              "folders of prompt deltas trained on source tasks")
        self.require_positive_ints("attention_hidden", "tasks", *(("n_sources",) if self.n_sources else ()))
        if self.target_init not in TARGET_INITS:
            raise ConfigError(f"attempt target_init must be one of {TARGET_INITS}, got {self.target_init!r}")


def read_source_prompt(folder: str | Path) -> torch.Tensor:
    """The (length, d) prompt of a saved prompt-tuning delta."""
    from safetensors.torch import load_file

    from ..serialization import DELTA_FILE, read_meta

    meta = read_meta(folder)
    prompts = [m for m in meta["methods"] if m["config"]["method"] == "prompt"]
    if len(prompts) != 1:
        raise ConfigError(f"{folder} is not a prompt-tuning delta (it holds "
                          f"{[m['config']['method'] for m in meta['methods']]}); ATTEMPT's sources are prompts")
    return load_file(str(Path(folder) / DELTA_FILE))[f"{prompts[0]['name']}.embedding"].float()


@register_method(AttemptConfig)
class Attempt(Prompt):
    reads_inputs = True
    serves_rows = False  # its prompt depends on the row's input, not on one shared insertion per task
    uses_task_ids = True  # multi-task: each row's target prompt is its task's (the call's task_ids)

    def __init__(self, config: AttemptConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        if self.vision:
            raise ConfigError("attempt prompts text models; for a ViT use vpt")
        d, n = model_map.hidden_size, config.length
        if config.sources:
            found = [read_source_prompt(folder) for folder in config.sources]
            bad = [(folder, tuple(p.shape)) for folder, p in zip(config.sources, found, strict=True)
                   if tuple(p.shape) != (n, d)]
            if bad:
                raise ConfigError(f"attempt's sources must be prompts of length {n} and width {d} (this config and "
                                  f"model); these are not: {bad}")
            sources = torch.stack(found)
        else:
            sources = torch.zeros(config.n_sources, n, d)  # filled by load
        self.register_buffer("sources", sources)
        # the target prompts, one per task: each the first source prompt (the reference's
        # update_prefix_weights_single / _multi), or zero (training starts from the sources' mixture)
        first = sources[0] if config.target_init == "first_source" and sources.shape[0] else torch.zeros(n, d)
        self.embedding = nn.Parameter(first.expand(config.tasks, n, d).clone())
        m = config.attention_hidden
        self.down = nn.Linear(d, m, bias=False)
        self.up = nn.Linear(m, d, bias=False)
        self.norm = nn.LayerNorm(d, elementwise_affine=False)  # the reference's LayerNorm, frozen at 1 and 0
        self.temperature = d * math.e
        self.__dict__["context"] = None  # the forward context (task_ids), set by install

    def install(self, installer) -> None:
        self.__dict__["context"] = installer.context
        super().install(installer)

    def task_ids(self, rows: int, device: torch.device) -> torch.Tensor:
        """Each row's task (the call's ``task_ids``, or task 0 when there is only one)."""
        ids = None if self.context is None else self.context.task_ids
        tasks = self.config.tasks
        if ids is None:
            if tasks == 1:
                return torch.zeros(rows, dtype=torch.long, device=device)
            raise ConfigError(f"attempt holds target prompts of {tasks} tasks: pass task_ids= (one task id per "
                              f"row, 0..{tasks - 1}) in the model call")
        if ids.shape[0] != rows or int(ids.max()) >= tasks or int(ids.min()) < 0:
            raise ConfigError(f"task_ids {ids.tolist()} do not fit a batch of {rows} rows and {tasks} attempt tasks")
        return ids.to(device=device, dtype=torch.long)

    def row_prompts(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = inputs.float()
        if mask is not None:
            x = x.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(x.dtype).min)
        pooled = x.max(dim=1).values  # (b, d)
        h = self.norm(self.up(F.silu(self.down(pooled))))
        target = self.embedding[self.task_ids(inputs.shape[0], inputs.device)]  # (b, n, d): each row's task's
        source_scores = h @ self.sources.max(dim=1).values.t()  # (b, sources)
        target_score = (h * target.max(dim=1).values).sum(-1, keepdim=True)  # (b, 1)
        weights = torch.softmax(torch.cat([source_scores, target_score], -1) / self.temperature, dim=-1)
        n_sources = self.sources.shape[0]
        mixed = (1 + weights[:, n_sources:, None]) * target  # P_t + a_t P_t
        if n_sources:
            mixed = mixed + torch.einsum("bj,jnd->bnd", weights[:, :n_sources], self.sources)
        return mixed.to(inputs.dtype)

    def saved_config(self) -> AttemptConfig:
        return replace(self.config, sources=(), n_sources=self.sources.shape[0])

"""ATTEMPT (Asai et al. 2022): a target prompt plus instance-level attention over frozen source prompts.

Source prompts are prompt-tuning deltas trained on source tasks (``unipelt train --method prompt``,
saved as usual). For each input, an attention module mixes them with the new task's own prompt:

    x = max-pool over the input's real tokens of their embeddings            (d)
    h = LayerNorm(W_up SiLU(W_down x))                                         (d -> m -> d)
    a = softmax_j( h . max-pool(P_j) / T ),  j over the sources and the target  (T = d e)
    P(x) = P_target + sum_j a_j P_j

and ``P(x)`` is inserted like a tuned prompt (after [CLS] in BERT-like encoders). Trainable: the
target prompt (zero at init, so training starts from the sources' mixture) and the attention module;
the sources are frozen and saved inside the delta (``n_sources`` in its config), so a saved ATTEMPT
delta loads without the source folders. Not mergeable; like any prompt it changes the output at init.
Parameters: ``length d + 2 d m + m + d + 2 d`` (attention module with its LayerNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, register
from ..sites import ModelMap
from .prompt import Prompt, PromptConfig


@register
@dataclass
class AttemptConfig(PromptConfig):
    method = "attempt"
    description = "ATTEMPT: target prompt + per-input attention over frozen source prompts (saved prompt deltas)"

    sources: tuple[str, ...] = ()  # folders of prompt deltas saved by unipelt (unipelt.save / unipelt train)
    n_sources: int = 0  # how many sources a saved delta holds (set on save; leave at 0 with sources)
    attention_hidden: int = 100

    def validate(self) -> None:
        super().validate()
        if not self.sources and self.n_sources < 1:
            raise ConfigError("attempt needs source prompts: sources=('out/mnli-prompt', 'out/qnli-prompt', ...), "
                              "folders of prompt deltas trained on source tasks")
        self.require_positive_ints("attention_hidden")


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


class Attempt(Prompt):
    config_class = AttemptConfig
    reads_inputs = True
    serves_rows = False  # its prompt depends on the row's input, not on one shared insertion per task

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
        with torch.no_grad():
            self.embedding.zero_()  # the target prompt: training starts from the sources' mixture
        m = config.attention_hidden
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        self.norm = nn.LayerNorm(d)
        self.temperature = d * math.e

    def row_prompts(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = inputs.float()
        if mask is not None:
            x = x.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(x.dtype).min)
        pooled = x.max(dim=1).values  # (b, d)
        h = self.norm(self.up(F.silu(self.down(pooled))))
        prompts = torch.cat([self.sources, self.embedding.unsqueeze(0)])  # (sources + 1, n, d)
        keys = prompts.max(dim=1).values  # (sources + 1, d)
        weights = torch.softmax(h @ keys.t() / self.temperature, dim=-1)  # (b, sources + 1)
        mixed = self.embedding + torch.einsum("bj,jnd->bnd", weights, prompts)
        return mixed.to(inputs.dtype)

    def saved_config(self) -> AttemptConfig:
        return replace(self.config, sources=(), n_sources=self.sources.shape[0])

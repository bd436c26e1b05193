"""Visual prompt tuning, VPT (Jia et al. 2022), for vision transformers: ``h_0 = [x_cls, drop(P_0), E]`` and, in
VPT-deep, ``h_i = [h_i[cls], drop(P_i), h_i[1 + length:]]`` before each layer ``i > 0``.

Reference: KMnP/vpt ``src/models/vit_prompt/vit.py`` (``incorporate_prompt``, ``forward_deep_prompt``) and
``src/configs/config.py``.

Shallow: ``length`` learned prompt tokens are inserted after [CLS] into the patch-embedding sequence
(after the position embeddings), so every layer sees ``1 + length + patches`` tokens. Deep: each
later layer gets its own ``length`` prompts too: before layer ``i > 0`` runs, the prompt positions'
hidden states are replaced by that layer's prompts (what the previous layer made of the old ones
is discarded, as in the paper). The classification head reads [CLS] and is trained too (unipelt's
task-head default). Prompts are initialised uniformly in ``+-sqrt(6 / (channels * patch^2 + d))``
(the paper's Xavier rule over the patch projection's fan-in and the width), so the model changes at
init, like any prompt. Prompt dropout (``drop``) acts on every insertion's prompts, each example's copy
drawn on its own, in training only (``nn.Dropout(PROMPT.DROPOUT)`` at vit.py:41, 82, 114): ``dropout``
None takes the reference's commands, 0.1 for VPT-deep and none for VPT-shallow ("we don't use dropout
for VPT-shallow", demo.ipynb; the config default PROMPT.DROPOUT is 0.0). Not mergeable. Parameters:
``length * d`` (shallow), ``layers * length * d`` (deep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..registry import Preset, register_method
from ..runtime import Installer
from ..sites import ModelMap
from .base import DeltaMethod


@dataclass
class VPTConfig(MethodConfig):
    method = "vpt"
    description = "VPT: learned prompt tokens after [CLS] of a ViT (deep=True: new prompts at every layer)"

    length: int = 10
    deep: bool = False
    seed: int = 0
    dropout: float | None = None  # on the prompts at every insertion; None: 0.1 deep, 0.0 shallow (the reference's)

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("length")
        if self.dropout is not None and (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                                         or not 0 <= self.dropout < 1):
            raise ConfigError(f"vpt dropout must be in [0, 1) or None, got {self.dropout!r}")

    @property
    def prompt_dropout(self) -> float:
        """The dropout rate in effect: ``dropout``, or the reference's 0.1 (deep) / 0.0 (shallow)."""
        if self.dropout is not None:
            return float(self.dropout)
        return 0.1 if self.deep else 0.0


@register_method(VPTConfig, presets={
    "vpt_deep": Preset("VPT-deep: new prompt tokens at the input of every ViT layer (prompt dropout 0.1)", deep=True),
})
class VPT(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection

    def __init__(self, config: VPTConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        model = model_map.model
        if model_map.family.name != "vit":
            raise ConfigError(f"vpt prompts vision transformers; {type(model).__name__} is a text model: use "
                              f"method 'prompt' for text")
        self.__dict__["embed_module"] = model.base_model.embeddings  # the base model's, not this delta's
        self.__dict__["layer_modules"] = [layer.module for layer in model_map.layers]
        d = model_map.hidden_size
        channels, patch = getattr(model.config, "num_channels", 3), getattr(model.config, "patch_size", 16)
        bound = math.sqrt(6.0 / (channels * patch * patch + d))
        gen = torch.Generator().manual_seed(config.seed)
        depth = len(model_map.layers) if config.deep else 1
        self.prompts = nn.Parameter((torch.rand(depth, config.length, d, generator=gen) * 2 - 1) * bound)

    def prompt(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Insertion ``i``'s prompts for ``like``'s batch, dropped out (each example's copy on its own) in training."""
        prompt = self.prompts[i].to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)
        return F.dropout(prompt, self.config.prompt_dropout, self.training)

    def install(self, installer: Installer) -> None:
        n = self.config.length

        def insert(module, inputs, output):
            return torch.cat([output[:, :1], self.prompt(0, output), output[:, 1:]], dim=1)

        installer.on_output(self.embed_module, insert)
        if not self.config.deep:
            return
        for i, layer in enumerate(self.layer_modules[1:], start=1):
            def replace(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :1], self.prompt(i, hidden), hidden[:, 1 + n:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            installer.on_call(layer, replace)

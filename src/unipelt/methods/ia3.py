"""IA3 (Liu et al. 2022): learned vectors scale keys, values and the FFN's intermediate activation.

``k <- l_k * k``, ``v <- l_v * v`` (every attention, self and cross) and ``a <- l_ff * a`` where
``a`` is the input of the FFN's output projection W_2. All vectors start at one (identity).
Reference: r-three/t-few ``src/models/lora.py`` (``LoRALinear`` with ``rank 0``, ``scaling_rank 1``: the
projection's output times the trained ``multi_lora_b``, ones at init; ``modify_with_lora``) and
``configs/ia3.json`` (k, v and the FFN's ``wi_1``, lr 3e-3); huggingface/peft ``tuners/ia3/layer.py`` the same.
Mergeable: rows of W_k, W_v (and their biases) and columns of W_2 are scaled.
Parameters per layer: ``d_k + d_v`` per attention plus ``d_ff``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like

TARGETS = ("k", "v", "ffn")


@dataclass
class IA3Config(MethodConfig):
    method = "ia3"
    description = "IA3: learned vectors rescale keys, values and the FFN activation (init ones)"

    targets: tuple[str, ...] = TARGETS

    def validate(self) -> None:
        super().validate()
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"ia3 targets must be a non-empty subset of {TARGETS}, got {list(self.targets)}")


def served_scale(scale: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``scale`` on the rows this delta serves (multi-task serving), one on the others."""
    return scale if rows is None else 1.0 + (scale - 1.0) * rows


@register_method(IA3Config)
class IA3(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: other tasks' rows keep a scale of one

    def __init__(self, config: IA3Config, model_map: ModelMap):
        super().__init__(config, model_map)
        self.outputs: dict[str, Projection] = {}  # scaled on their output
        self.inputs: dict[str, Projection] = {}  # scaled on their input (W_2)
        for layer in model_map.layers:
            for att in layer.attentions:
                for t in ("k", "v"):
                    if t in config.targets:
                        self.outputs[f"{layer.key}_{att.kind}_{t}"] = att.projection(t)
            if "ffn" in config.targets:
                self.inputs[f"{layer.key}_ffn"] = layer.ffn_out
        self.scales = nn.ParameterDict()
        for k, proj in self.outputs.items():
            self.scales[k] = nn.Parameter(torch.ones(proj.out_features))
        for k, proj in self.inputs.items():
            self.scales[k] = nn.Parameter(torch.ones(proj.in_features))

    def install(self, installer: Installer) -> None:
        for k, proj in self.outputs.items():
            installer.on_output(proj.module, self._output_hook(k, proj, installer.rows))
        for k, proj in self.inputs.items():
            installer.on_input(proj.module, self._input_hook(k, installer.rows))

    def _output_hook(self, k: str, proj: Projection, rows):
        def scale_output(module, inputs, output):
            scale = self.scales[k]  # read per call (FSDP swaps parameters each forward)
            return output * served_scale(cast_like(proj.place(scale, fill=1.0), output), rows(output))

        return scale_output

    def _input_hook(self, k: str, rows):
        def scale_input(module, inputs):
            scale = self.scales[k]
            x = inputs[0]
            return (x * served_scale(cast_like(scale, x), rows(x)), *inputs[1:])

        return scale_input

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for k, proj in self.outputs.items():
            proj.scale_outputs(self.scales[k])
        for k, proj in self.inputs.items():
            proj.scale_inputs(self.scales[k])

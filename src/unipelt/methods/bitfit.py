"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

``y = f(x) + (b + db)`` for every module ``f(x) + b`` of the pretrained body that has a bias, ``db`` starting
at zero. Where: every bias of the body (linear layers, GPT-2's Conv1D, LayerNorms, convolutional patch
embeddings, the [CLS] pooler's dense layer).
Reference: benzakenelad/BitFit ``glue_evaluator.py`` (``GLUEvaluator._deactivate_relevant_gradients`` with
``BIAS_TERMS_DICT['all']``: every parameter named ``bias`` trains, the pooler's included, and the classifier).

Implemented as a zero-initialised additive delta on every bias of the pretrained body (linear
layers, GPT-2's Conv1D, LayerNorms, convolutional patch embeddings), so the base weights stay
untouched until ``merge`` adds the deltas into the biases. Task heads train as usual. Families
without bias terms (LLaMA, T5) get a clear error. Parameters: the number of bias entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap
from .base import DeltaMethod, cast_like


@dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"
    description = "BitFit: train only the bias terms (as additive, mergeable deltas)"


def _has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, nn.Parameter) and (
        isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d)) or type(module).__name__ == "Conv1D")


@register_method(BitFitConfig)
class BitFit(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: its bias deltas reach its task's rows only

    def __init__(self, config: BitFitConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.modules_by_key = {path.replace(".", "__"): m for path, m in model_map.base_modules() if _has_bias(m)}
        if not self.modules_by_key:
            raise ConfigError(f"{type(model_map.model).__name__} has no bias terms, so BitFit does not apply; "
                              f"try 'ln' or 'ia3'")
        self.biases = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(m.bias, dtype=torch.float32))
                                        for k, m in self.modules_by_key.items()})

    def install(self, installer: Installer) -> None:
        for k, module in self.modules_by_key.items():
            installer.on_output(module, self._hook(k, isinstance(module, nn.Conv2d), installer.rows))

    def _hook(self, k: str, channels_first: bool, rows):
        def add_bias(module, inputs, output):
            delta = self.biases[k]  # read per call (FSDP swaps parameters each forward)
            d = cast_like(delta[:, None, None] if channels_first else delta, output)
            served = rows(output)
            return output + (d if served is None else d * served)

        return add_bias

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for k, module in self.modules_by_key.items():
            module.bias.add_(self.biases[k].to(module.bias.dtype))

"""AdapterBias (Fu et al. 2022): a token-dependent shift of the FFN output.

``h <- h + alpha(h) v`` after the FFN's output projection W_2 (before the residual add and
LayerNorm), with ``v`` in R^d a shift vector and ``alpha(h) = w . h + c`` a linear layer d -> 1
giving each token its weight. ``v`` starts at zero, so the model starts as the base model.
Parameters per layer: ``2 d + 1``. Mergeable, since ``alpha`` is linear: ``W_2 <- (I + v w^T) W_2``,
``b_2 <- (I + v w^T) b_2 + c v``; a W_2 without a bias (LLaMA) cannot hold ``c v``, so there it stays
a delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig, register
from ..runtime import Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input


@register
@dataclass
class AdapterBiasConfig(MethodConfig):
    method = "adapter_bias"
    description = "AdapterBias: a shift vector v weighted per token by a linear alpha(h), after the FFN"


class AdapterBias(DeltaMethod):
    config_class = AdapterBiasConfig
    serves_rows = True

    def __init__(self, config: AdapterBiasConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: dict[str, Projection] = {f"{layer.key}_ffn": layer.ffn_out for layer in model_map.layers}
        self.shifts = nn.ParameterDict({k: nn.Parameter(torch.zeros(p.out_features)) for k, p in self.sites.items()})
        self.alphas = nn.ModuleDict({k: nn.Linear(p.out_features, 1) for k, p in self.sites.items()})

    def install(self, installer: Installer) -> None:
        for k, proj in self.sites.items():
            installer.on_output(proj.module, self._hook(k, proj, installer.own_rows))

    def _hook(self, k: str, proj: Projection, own_rows):
        shift, alpha = self.shifts[k], self.alphas[k]

        def add_shift(module, inputs, output):
            weight = F.linear(matmul_input(output, alpha.weight), alpha.weight, alpha.bias)  # (..., 1)
            return output + proj.place(cast_like(own_rows(weight * shift), output))

        return add_shift

    def mergeable(self) -> bool:
        return all(p.bias() is not None for p in self.sites.values())

    @torch.no_grad()
    def merge(self) -> None:
        for k, proj in self.sites.items():
            v, w, c = self.shifts[k].float(), self.alphas[k].weight[0].float(), self.alphas[k].bias[0].float()
            weight, bias = proj.weight().float(), proj.bias()
            proj.add_to_weight(torch.outer(v, w @ weight))  # W <- W + v (w^T W)
            bias.add_((v * (w @ bias.float() + c)).to(bias.dtype))  # b <- b + v (w . b + c)

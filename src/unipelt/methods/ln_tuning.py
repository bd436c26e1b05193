"""LN-tuning (Qi et al. 2022): train only the LayerNorm gains and biases.

Implemented as zero-initialised deltas ``dg``, ``db`` on every normalisation layer of the
pretrained body (LayerNorm, and RMSNorm in LLaMA and T5): ``y' = y + dg * n(x) + db`` where
``n(x)`` is the normalised input before the affine map. The base weights stay untouched until
``merge`` adds the deltas to the gains and biases. Parameters: the norms' gain and bias sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig, register
from ..runtime import Installer
from ..sites import ModelMap
from .base import DeltaMethod, cast_like


@register
@dataclass
class LNConfig(MethodConfig):
    method = "ln"
    description = "LN-tuning: train only LayerNorm gains and biases (as mergeable deltas)"


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(getattr(module, "weight", None), nn.Parameter) and (
        isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm"))


def normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output before its gain and bias."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LNTuning(DeltaMethod):
    config_class = LNConfig

    def __init__(self, config: LNConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.norms = {path.replace(".", "__"): m for path, m in model_map.base_modules() if _is_norm(m)}
        if not self.norms:
            raise ConfigError(f"{type(model_map.model).__name__} has no LayerNorm or RMSNorm layers")
        self.gains = nn.ParameterDict({k: nn.Parameter(torch.zeros(m.weight.shape)) for k, m in self.norms.items()})
        self.biases = nn.ParameterDict({k: nn.Parameter(torch.zeros(m.bias.shape)) for k, m in self.norms.items()
                                        if isinstance(getattr(m, "bias", None), nn.Parameter)})

    def install(self, installer: Installer) -> None:
        for k, module in self.norms.items():
            if isinstance(module, nn.LayerNorm):
                installer.override_forward(module, self._tuned_layer_norm(k, module))
            else:
                installer.on_output(module, self._hook(k))

    def _tuned_layer_norm(self, k: str, module: nn.LayerNorm):
        """LayerNorm with gain ``g + dg`` and bias ``b + db``: one norm kernel, as the base model runs."""
        gain = self.gains[k]
        bias = self.biases[k] if k in self.biases else None  # noqa: SIM401 (ParameterDict)

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = module.weight + gain
            b = module.bias + bias if bias is not None else module.bias
            return F.layer_norm(x, module.normalized_shape, w, b, module.eps)

        return forward

    def _hook(self, k: str):
        gain = self.gains[k]
        bias = self.biases.get(k, None)

        def shift(module, inputs, output):
            out = output + cast_like(gain, output) * normalised(module, inputs[0]).to(output.dtype)
            return out + cast_like(bias, output) if bias is not None else out

        return shift

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for k, module in self.norms.items():
            module.weight.add_(self.gains[k].to(module.weight.dtype))
            if k in self.biases:
                module.bias.add_(self.biases[k].to(module.bias.dtype))

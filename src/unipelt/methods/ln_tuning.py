"""LN-tuning (Qi et al. 2022): train only the LayerNorm gains and biases.

``LN(x) = g' * (x - mean x) / std x + b'`` with ``g' = g + dg``, ``b' = b + db`` (RMSNorm: ``g' * rms_norm(x)``),
at every normalisation layer of the pretrained body, the embeddings' LayerNorm included.
Reference: the paper, Qi et al. 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained
Language Models" (arXiv 2211.08682), its LN-tuning method (the authors released no code; PapersWithCode lists
none); the implementation compared is huggingface/peft ``tuners/ln_tuning/layer.py`` (``LNTuningLayer``: a
trained copy of each target norm, starting at the base values).

Every normalisation layer of the pretrained body (LayerNorm, and RMSNorm in LLaMA and T5) gets
trainable gain and bias ``g' = g + dg``, ``b' = b + db``, starting at the base values (``dg = db = 0``).
A LayerNorm then runs as one norm with ``g'``, ``b'`` (as cheap as the base model's), and so does an
RMSNorm whose forward is found, on a probe input at attach time, to compute ``g * rms_norm(x)`` (LLaMA's,
Mistral's, Qwen's, T5's): one ``F.rms_norm``, fused on CUDA, where the base model runs an elementwise
chain. Other norms (Gemma's ``(1 + g)``, say) keep their code and add ``dg * n(x) + db``, ``n(x)`` the
normalised input. The base weights stay untouched
until ``merge`` writes ``g'``, ``b'`` into them; ``save`` stores ``dg``, ``db``. Weight decay, if any,
pulls ``g'`` towards zero (as in peft's LN tuning). Parameters: the norms' gain and bias sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap
from .base import DeltaMethod, cast_like


@dataclass
class LNConfig(MethodConfig):
    method = "ln"
    description = "LN-tuning: train only LayerNorm gains and biases (as mergeable deltas)"


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(getattr(module, "weight", None), nn.Parameter) and (
        isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm"))


def _eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


@torch.no_grad()
def is_plain_rms_norm(module: nn.Module) -> bool:
    """Whether ``module(x)`` equals ``weight * rms_norm(x)`` (no bias, no offset), tried on a probe input."""
    weight, eps = module.weight, _eps(module)
    if eps is None or weight.dim() != 1 or isinstance(getattr(module, "bias", None), nn.Parameter) \
            or weight.device.type == "meta":
        return False
    probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device) * 3 + 0.5
    try:
        out = module(probe)
    except Exception:  # an unusual signature: keep the generic hook
        return False
    expected = F.rms_norm(probe, (weight.numel(),), weight.float(), eps)
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(
        out.float(), expected, rtol=1e-5, atol=1e-5)


def normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output before its gain and bias."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = _eps(module)
    eps = 1e-6 if eps is None else eps
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@register_method(LNConfig)
class LNTuning(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: other tasks' rows keep the base gains and biases

    def __init__(self, config: LNConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.norms = {path.replace(".", "__"): m for path, m in model_map.base_modules() if _is_norm(m)}
        if not self.norms:
            raise ConfigError(f"{type(model_map.model).__name__} has no LayerNorm or RMSNorm layers")
        # The parameters are the tuned gains and biases themselves, starting at the base values (so a
        # LayerNorm runs as one norm, as in the base model); what is saved and merged is their delta.
        self.gains = nn.ParameterDict({k: nn.Parameter(m.weight.detach().float().clone())
                                       for k, m in self.norms.items()})
        self.biases = nn.ParameterDict({k: nn.Parameter(m.bias.detach().float().clone())
                                        for k, m in self.norms.items()
                                        if isinstance(getattr(m, "bias", None), nn.Parameter)})

    def install(self, installer: Installer) -> None:
        for k, module in self.norms.items():
            if installer.forward_replaced(module):  # another served task's LN tuning runs it: add ours to it
                installer.on_output(module, self._hook(k, installer.own_rows))
            elif isinstance(module, nn.LayerNorm):
                installer.override_forward(module, self._tuned_layer_norm(k, module, installer.rows))
            elif is_plain_rms_norm(module):
                installer.override_forward(module, self._tuned_rms_norm(k, module, installer.rows))
            else:
                installer.on_output(module, self._hook(k, installer.own_rows))

    def _gain_and_bias(self, k: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read per call, not once at install: FSDP swaps a module's parameters for gathered ones each forward."""
        return self.gains[k], (self.biases[k] if k in self.biases else None)  # noqa: SIM401 (ParameterDict)

    def _tuned_layer_norm(self, k: str, module: nn.LayerNorm, rows):
        def forward(x: torch.Tensor) -> torch.Tensor:
            gain, bias = self._gain_and_bias(k)
            served = rows(x)
            if served is not None:  # multi-task serving: tuned gain and bias on this task's rows, base elsewhere
                y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
                w = module.weight + (gain - module.weight) * served
                b = module.bias + (bias - module.bias) * served if bias is not None else module.bias
                return y * cast_like(w, y) + (cast_like(b, y) if b is not None else 0.0)
            w, b = gain, bias
            if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
            return F.layer_norm(x, module.normalized_shape, w, b, module.eps)

        return forward

    def _tuned_rms_norm(self, k: str, module: nn.Module, rows):
        eps, shape = _eps(module), tuple(module.weight.shape)

        def forward(x: torch.Tensor) -> torch.Tensor:
            gain = self.gains[k]
            # The gain in the base weight's dtype, so that the output's dtype is the base norm's
            # (``weight * normalised``: bf16 weights keep bf16, float32 master weights promote).
            w = cast_like(gain, module.weight)
            served = rows(x)
            if served is not None:  # multi-task serving: the tuned gain on this task's rows, the base elsewhere
                w = module.weight + (w - module.weight) * served
            elif w.dtype == x.dtype:
                return F.rms_norm(x, shape, w, eps)  # one fused kernel each way on CUDA
            return w * F.rms_norm(x, shape, None, eps)

        return forward

    def _hook(self, k: str, own_rows):
        """Other norms (RMSNorm, T5's) keep their own code: ``y + (g' - g) n(x) + (b' - b)``."""
        def shift(module, inputs, output):
            gain, bias = self._gain_and_bias(k)
            dg = cast_like(gain - module.weight, output)
            delta = dg * normalised(module, inputs[0]).to(output.dtype)
            if bias is not None:
                delta = delta + cast_like(bias - module.bias, output)
            return output + own_rows(delta)

        return shift

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for k, module in self.norms.items():
            module.weight.copy_(self.gains[k].to(module.weight.dtype))
            if k in self.biases:
                module.bias.copy_(self.biases[k].to(module.bias.dtype))

    def delta_state(self) -> dict[str, torch.Tensor]:
        """The saved delta: tuned minus base values (zero for an untrained method)."""
        with torch.no_grad():
            state = {f"gains.{k}": (g - self.norms[k].weight.float()).detach() for k, g in self.gains.items()}
            state.update({f"biases.{k}": (b - self.norms[k].bias.float()).detach() for k, b in self.biases.items()})
        return state

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"gains.{k}" for k in self.gains} | {f"biases.{k}" for k in self.biases}
        if set(state) != expected:
            raise ConfigError(f"saved delta does not fit method 'ln': missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
        with torch.no_grad():
            for k, g in self.gains.items():
                g.copy_(self.norms[k].weight.float() + state[f"gains.{k}"].to(g.device, torch.float32))
            for k, b in self.biases.items():
                b.copy_(self.norms[k].bias.float() + state[f"biases.{k}"].to(b.device, torch.float32))

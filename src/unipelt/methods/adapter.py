"""Bottleneck adapters: serial (Houlsby, Pfeiffer), parallel and scaled parallel (He et al. 2022).

``adapter(h) = W_up f(W_down h + b_down) + b_up``, with ``W_up`` and ``b_up`` zero so the model
starts as the base model. Placements:

- ``houlsby``: after every attention output projection (self and cross) and after the FFN's W_2;
- ``pfeiffer``: after the FFN's W_2 only;
- ``attention``: after the attention output projections only.

Serial: ``h <- h + s * G * adapter(h)`` on the sub-layer's projected output, before the residual
add and LayerNorm. Parallel: the adapter reads the sub-layer's input ``x`` (the input of W_q or
W_1) and adds ``s * G * adapter(x)`` to the sub-layer's output. ``s`` is ``scaling`` (4 for
scaled PA); ``G`` is the UniPELT gate ``sigmoid(W_G . input)`` when ``gate=True``, else 1.
Not mergeable (non-linearity). Parameters per adapter: ``2 d m + d + m`` (gate: ``d + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig, register, register_preset
from ..kernels import bottleneck as fused
from ..runtime import Gate, Installer, stacked_linear
from ..sites import ModelMap, Projection
from .base import DeltaMethod, activation, cast_like, matmul_input

PLACEMENTS = ("houlsby", "pfeiffer", "attention")


@register
@dataclass
class AdapterConfig(MethodConfig):
    method = "adapter"
    description = "bottleneck adapter: serial (houlsby/pfeiffer) or parallel, with a scaling factor"
    gateable = True

    bottleneck: int = 64
    placement: str = "pfeiffer"
    parallel: bool = False
    scaling: float = 1.0
    activation: str = "relu"

    def validate(self) -> None:
        super().validate()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"unknown adapter placement {self.placement!r}; choose one of {PLACEMENTS}")
        self.require_positive_ints("bottleneck")
        activation(self.activation)


register_preset("houlsby", AdapterConfig, "serial adapters after attention and FFN (Houlsby et al. 2019)",
                placement="houlsby")
register_preset("pfeiffer", AdapterConfig, "one serial adapter after the FFN (Pfeiffer et al. 2021)",
                placement="pfeiffer")
register_preset("parallel", AdapterConfig, "parallel adapter on the FFN (He et al. 2022)",
                placement="pfeiffer", parallel=True)
register_preset("scaled_parallel", AdapterConfig, "scaled parallel adapter on the FFN, m=512, s=4 (He et al. 2022)",
                placement="pfeiffer", parallel=True, scaling=4.0, bottleneck=512)


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int, act: str):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.act = activation(act)
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up  # weights used directly: module calls cost Python time per site
        h = self.act(F.linear(matmul_input(x, down.weight), down.weight, down.bias))
        return F.linear(h, up.weight, up.bias)


@dataclass
class _Site:
    read: nn.Module  # module whose input (parallel) or output (serial) the adapter reads
    write: Projection  # projection whose output receives the adapter's delta


class Adapter(DeltaMethod):
    config_class = AdapterConfig
    serves_rows = True  # multi-task serving: acts on its task's rows of a batch only

    def __init__(self, config: AdapterConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: dict[str, _Site] = {}
        for layer in model_map.layers:
            if config.placement in ("houlsby", "attention"):
                for att in layer.attentions:
                    reader = att.q.module if config.parallel else att.o.module
                    self.sites[f"{layer.key}_{att.kind}_attn"] = _Site(reader, att.o)
            if config.placement in ("houlsby", "pfeiffer"):
                reader = layer.ffn_in[0].module if config.parallel else layer.ffn_out.module
                self.sites[f"{layer.key}_ffn"] = _Site(reader, layer.ffn_out)
        self.adapters = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for site_key, site in self.sites.items():
            d = site.write.out_features
            self.adapters[site_key] = self._bottleneck(d)
            if config.gate:
                self.gates[site_key] = Gate(d)

    def _bottleneck(self, d: int) -> nn.Module:
        """The module mapping a site's input to its delta (subclasses build other bottlenecks)."""
        return Bottleneck(d, self.config.bottleneck, self.config.activation)

    def _delta(self, site_key: str, x: torch.Tensor) -> torch.Tensor:
        if site_key not in self.gates:
            delta = self.adapters[site_key](x)
            return delta * self.config.scaling if self.config.scaling != 1.0 else delta
        # UniPELT's gate reads the adapter's input: W_down and the gate's row run as one GEMM over x
        w_down, b_down, w_up, b_up = self._bottleneck_weights(site_key)
        gate = self.gates[site_key].proj
        down, gate_logit = stacked_linear(x, [w_down, gate.weight], [b_down, gate.bias], [w_down.shape[0], 1])
        delta = F.linear(self.adapters[site_key].act(down), w_up, b_up)
        scale = torch.sigmoid(gate_logit)  # scale the (tokens, 1) gate, not the (tokens, d) delta
        return delta * (scale * self.config.scaling if self.config.scaling != 1.0 else scale)

    def _fusable(self, site_key: str) -> bool:
        """Whether the site's bottleneck computes what :mod:`~unipelt.kernels.bottleneck` fuses, a plain
        ``f(x W_d^T + b_d) W_u^T + b_u`` (subclasses with bottlenecks of their own say whether theirs does)."""
        return type(self.adapters[site_key]) is Bottleneck

    def _bottleneck_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """``(W_down, b_down, W_up, b_up)`` of a site's bottleneck, as the fused kernels and the gated path read
        them."""
        bottleneck = self.adapters[site_key]
        return bottleneck.down.weight, bottleneck.down.bias, bottleneck.up.weight, bottleneck.up.bias

    def _add_delta(self, installer: Installer, site_key: str, x: torch.Tensor, output: torch.Tensor,
                   serial: bool) -> torch.Tensor:
        """``output`` plus the site's (gated, scaled) delta of ``x``; by the fused kernels where they compute it."""
        config = self.config
        down_bias = self.adapters[site_key].down.bias  # (m,) in the weights' dtype, for every bottleneck type
        gate = self.gates[site_key].proj if site_key in self.gates else None
        if x.shape == output.shape and installer.row_mask() is None and self._fusable(site_key) and \
                fused.available(output, down_bias.dtype, down_bias.shape[0], config.activation, gate is not None):
            # a parallel adapter's input may be a LayerNorm's float32 output: autocast's GEMM would cast it too
            gate_weights = (gate.weight, gate.bias) if gate is not None else (None, None)
            return fused.bottleneck_add(cast_like(x, output), None if serial else output,
                                        *self._bottleneck_weights(site_key), config.activation, config.scaling,
                                        *gate_weights)
        return output + cast_like(installer.own_rows(self._delta(site_key, x)), output)

    def install(self, installer: Installer) -> None:
        for site_key, site in self.sites.items():
            if self.config.parallel:
                self._install_parallel(installer, site_key, site)
            else:
                installer.on_output(site.write.module, self._serial_hook(site_key, installer))

    def _serial_hook(self, site_key: str, installer: Installer):
        def serial(module, inputs, output):
            return self._add_delta(installer, site_key, output, output, serial=True)

        return serial

    def _install_parallel(self, installer: Installer, site_key: str, site: _Site) -> None:
        stash = installer.context.values
        slot = (id(self), site_key)

        def read_input(module, inputs):
            stash[slot] = inputs[0]

        def add_parallel(module, inputs, output):
            x = stash.pop(slot, None)
            if x is None:
                raise RuntimeError(f"parallel adapter {site_key}: sub-layer input was not seen before its output")
            return self._add_delta(installer, site_key, x, output, serial=False)

        installer.on_input(site.read, read_input)
        installer.on_output(site.write.module, add_parallel)

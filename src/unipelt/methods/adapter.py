"""Bottleneck adapters: serial (Houlsby, Pfeiffer), parallel and scaled parallel (He et al. 2022).

``A(x) = W_up f(W_down x + b_down) + b_up``, and ``s * G * A(x)`` is added where the placement says, with
``s`` the scaling (4 for scaled PA) and ``G`` UniPELT's gate (:func:`~unipelt.runtime.gate_values`: the mean
over the example's tokens of ``sigmoid(w_g . x_t + b_g)``, read from the adapter's input), else 1.
Reference: adapter-hub/adapters ``methods/modeling.py`` (``Adapter``) with ``configuration/adapter_config.py``
(``SeqBnConfig``, ``DoubleSeqBnConfig``); google-research/adapter-bert ``modeling.py`` (Houlsby's);
jxhe/unify-parameter-efficient-tuning ``petl/petl_factory.py`` (``Adapter_Layer``: parallel and scaled parallel).

Where, with ``h`` a sub-layer's output after its dropout and ``x`` its residual input (the references below):

- ``pfeiffer`` (serial, FFN only): post-LN models ``LN(h + x + G A(LN(h + x)))``: the adapter reads the
  layer's normalised output and the same LayerNorm runs again over the sum (adapters' ``SeqBnConfig``,
  ``original_ln_before=True``: adapter-hub/adapters ``methods/modeling.py`` ``Adapter.pre_forward`` and
  ``post_forward``; morningmoni/UniPELT ``transformers/adapters/layer.py`` L125-135, L371-376). Pre-LN models
  (GPT-2, LLaMA, T5, ViT) have no LayerNorm there: ``x + h + G A(h + x)``, as adapters computes with no
  LayerNorm.
- ``houlsby`` (serial, after every attention and the FFN): ``h + G A(h)`` before the residual add and
  LayerNorm (adapters' ``DoubleSeqBnConfig``; google-research/adapter-bert ``modeling.py``). ``attention``:
  the same after the attentions only; ``ffn``, ``h' + G A(h')`` with ``h'`` W_2's output before its dropout
  (``unipelt_legacy``'s adapter).
- ``parallel=True``: ``h + s G A(x_in)`` with ``x_in`` the sub-layer's input (W_1's, or W_q's), dropout
  p = the model's hidden dropout on ``f(W_down x_in + b_down)`` in training (jxhe/unify-parameter-efficient-
  tuning ``petl/petl_factory.py`` ``Adapter_Layer``, ``modeling_roberta.py`` L524-543). The attention-side
  parallel adapter of that repository reads ``LN_a(x)`` and adds before W_o; ours reads W_q's input and
  adds after the attention's output projection (no preset uses it).

Init (``init``): ``"bert"``, W_down and W_up ~ N(0, 0.02) with zero biases, the serial adapters' (adapters'
``init_weights="bert"``, UniPELT's ``init_bert_weights``; not the identity at init); ``"lora"``, W_down
Kaiming-uniform, b_down, W_up and b_up zero, the parallel adapters' (UV ``petl_factory.py`` L429-434, adapters'
``"mam_adapter"``; the identity at init). Default bottleneck ``d / 16`` (adapters' reduction factor 16: 48 on
BERT-base, UniPELT's). Houlsby's activation is swish (adapters), Pfeiffer's ReLU. Not mergeable.
Parameters per adapter: ``2 d m + d + m`` (gate: ``d + 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..families import hidden_dropout
from ..kernels import bottleneck as fused
from ..registry import Preset, register_method
from ..runtime import Gate, Installer, gate_per_token, gate_values, stacked_linear
from ..sites import ModelMap
from .base import DeltaMethod, activation, cast_like, matmul_input

PLACEMENTS = ("houlsby", "pfeiffer", "attention", "ffn")
INITS = ("bert", "lora")


@dataclass
class AdapterConfig(MethodConfig):
    method = "adapter"
    description = "bottleneck adapter: serial (houlsby/pfeiffer) or parallel, with a scaling factor"
    gateable = True

    bottleneck: int | None = None  # None: d / 16 (adapters' reduction factor 16; 48 on BERT-base)
    placement: str = "pfeiffer"
    parallel: bool = False
    scaling: float = 1.0
    activation: str = "relu"
    init: str | None = None  # "bert" | "lora"; None: "bert" when serial, "lora" when parallel
    dropout: float | None = None  # on f(W_down x) in training; None: the model's hidden dropout if parallel, else 0

    def validate(self) -> None:
        super().validate()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"unknown adapter placement {self.placement!r}; choose one of {PLACEMENTS}")
        if self.bottleneck is not None:
            self.require_positive_ints("bottleneck")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"adapter init must be one of {INITS} (or unset for the placement's own), "
                              f"got {self.init!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        activation(self.activation)

    def width(self, d: int) -> int:
        """The bottleneck ``m`` for a model of width ``d``."""
        return self.bottleneck if self.bottleneck is not None else max(1, d // 16)

    @property
    def resolved_init(self) -> str:
        return self.init if self.init is not None else ("lora" if self.parallel else "bert")


class Bottleneck(nn.Module):
    def __init__(self, d: int, m: int, act: str, init: str = "bert"):
        super().__init__()
        self.down = nn.Linear(d, m)
        self.act = activation(act)
        self.up = nn.Linear(m, d)
        init_bottleneck(self.down, self.up, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up  # weights used directly: module calls cost Python time per site
        h = self.act(F.linear(matmul_input(x, down.weight), down.weight, down.bias))
        return F.linear(h, up.weight, up.bias)


@torch.no_grad()
def init_bottleneck(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """``"bert"``: both weights N(0, 0.02), biases zero; ``"lora"``: W_down Kaiming-uniform (a = sqrt 5), the rest
    zero (see the module's docstring for the references)."""
    if init == "bert":
        for layer in (down, up):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    else:
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)


@dataclass
class _Site:
    output: nn.Module  # the sub-layer's output (after its dropout): serial adapters read it, all add to it
    width: int
    causal: bool  # a causal layer: the gate stays per token
    reader: nn.Module | None = None  # parallel: the module whose input the adapter reads
    norm: nn.Module | None = None  # pfeiffer: the LayerNorm of the FFN's residual
    norm_first: bool = False  # pfeiffer: that LayerNorm reads the FFN's input (pre-LN)


@register_method(AdapterConfig, presets={
    "houlsby": Preset("serial adapters after attention and FFN, swish (Houlsby et al. 2019)",
                      placement="houlsby", activation="swish"),
    "pfeiffer": Preset("one serial adapter after the FFN, inside its LayerNorm (Pfeiffer et al. 2021)",
                       placement="pfeiffer"),
    "parallel": Preset("parallel adapter on the FFN (He et al. 2022)", placement="pfeiffer", parallel=True),
    "scaled_parallel": Preset("scaled parallel adapter on the FFN, m=512, s=4 (He et al. 2022)",
                              placement="pfeiffer", parallel=True, scaling=4.0, bottleneck=512),
})
class Adapter(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: acts on its task's rows of a batch only

    def __init__(self, config: AdapterConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: dict[str, _Site] = {}
        for layer in model_map.layers:
            if config.placement in ("houlsby", "attention"):
                for att in layer.attentions:
                    self.sites[f"{layer.key}_{att.kind}_attn"] = _Site(
                        att.output_module, att.o.out_features, layer.causal,
                        reader=att.q.module if config.parallel else None)
            if config.placement in ("houlsby", "pfeiffer", "ffn"):
                pfeiffer = config.placement == "pfeiffer" and not config.parallel
                output = layer.ffn_out.module if config.placement == "ffn" else layer.ffn_output_module
                self.sites[f"{layer.key}_ffn"] = _Site(
                    output, layer.ffn_out.out_features, layer.causal,
                    reader=layer.ffn_in[0].module if config.parallel else None,
                    norm=layer.ffn_norm if pfeiffer else None, norm_first=layer.norm_first)
        self.bottleneck = config.width(model_map.hidden_size)
        self.dropout = config.dropout if config.dropout is not None else (
            hidden_dropout(getattr(model_map.model, "config", None)) if config.parallel else 0.0)
        self.adapters = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for site_key, site in self.sites.items():
            self.adapters[site_key] = self._bottleneck(site.width)
            if config.gate:
                self.gates[site_key] = Gate(site.width)

    def _bottleneck(self, d: int) -> nn.Module:
        """The module mapping a site's input to its delta (subclasses build other bottlenecks)."""
        return Bottleneck(d, self.bottleneck, self.config.activation, self.config.resolved_init)

    def _plain_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """``(W_down, b_down, W_up, b_up)`` of a site's bottleneck, as the unfused path computes with them."""
        bottleneck = self.adapters[site_key]
        return bottleneck.down.weight, bottleneck.down.bias, bottleneck.up.weight, bottleneck.up.bias

    def _delta(self, site_key: str, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """``s * G * A(x)`` with ``A(x) = W_up D(f(W_down x + b_down)) + b_up`` (``D`` dropout, in training). With a
        gate, W_down and the gate's row run as one GEMM over x (:func:`~unipelt.runtime.stacked_linear`: both read
        the adapter's input), the same as two."""
        w_down, b_down, w_up, b_up = self._plain_weights(site_key)
        gate = self.gates[site_key].proj if site_key in self.gates else None
        if gate is None:
            down = F.linear(matmul_input(x, w_down), w_down, b_down)
        else:
            down, gate_logit = stacked_linear(x, [w_down, gate.weight], [b_down, gate.bias], [w_down.shape[0], 1])
        h = self.adapters[site_key].act(down)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, True)
        delta = F.linear(h, w_up, b_up)
        scale = self.config.scaling
        if gate is None:
            return delta * scale if scale != 1.0 else delta
        g = gate_values(gate_logit, self.config.gate_pooling, padding_mask, self.sites[site_key].causal)
        return delta * (g * scale if scale != 1.0 else g)  # scale the (b, 1 or T, 1) gate, not the delta

    def install(self, installer: Installer) -> None:
        for site_key, site in self.sites.items():
            if site.reader is not None:  # parallel: h + s G A(x_in)
                self._install_read_then_add(installer, site_key, site.reader, site.output, lambda x, h: x)
            elif site.norm is not None and not site.norm_first:
                installer.on_output(site.norm, self._inside_norm_hook(site_key, installer))
            elif site.norm is not None:  # pre-LN Pfeiffer: h + G A(h + x)
                self._install_read_then_add(installer, site_key, site.norm, site.output, lambda x, h: h + x)
            else:
                installer.on_output(site.output, self._serial_hook(site_key, installer))

    def _serial_hook(self, site_key: str, installer: Installer):
        def serial(module, inputs, output):  # h + G A(h)
            return self._add_delta(installer, site_key, output, output)

        return serial

    def _inside_norm_hook(self, site_key: str, installer: Installer):
        def inside_norm(norm, inputs, y):  # y = LN(h + x) -> LN(h + x + G A(y))
            # ``norm.forward``, not ``norm(...)``: no hook of its own runs twice; a tuned norm (LN tuning) runs tuned
            out = norm.forward(self._add_delta(installer, site_key, y, inputs[0]))
            rows = installer.rows(out)  # multi-task serving: other tasks' rows keep what their own adapter made
            return out if rows is None else torch.where(rows.bool(), out, y)

        return inside_norm

    def _install_read_then_add(self, installer: Installer, site_key: str, reader: nn.Module, output: nn.Module,
                               adapter_input) -> None:
        """Stash what ``reader`` reads; at ``output``, add the delta of ``adapter_input(stashed, output)``. Parallel:
        the sub-layer's input; pre-LN Pfeiffer: ``h + x``, ``x`` being what the FFN's LayerNorm reads."""
        stash, slot = installer.context.values, (id(self), site_key)

        def read(module, inputs):
            stash[slot] = inputs[0]

        def add(module, inputs, out):
            seen = stash.pop(slot, None)
            if seen is None:
                raise RuntimeError(f"adapter {site_key}: {type(reader).__name__}'s input was not seen before the "
                                   f"sub-layer's output")
            return self._add_delta(installer, site_key, adapter_input(seen, out), out)

        installer.on_input(reader, read)
        installer.on_output(output, add)

    # --- speed path: ``_add_delta`` adds ``_delta``'s ``s G A(x)`` (above) to the residual, or has the fused
    # kernels of :mod:`unipelt.kernels.bottleneck` compute the same sum, both passes, where they apply (a per-token
    # gate or none, no dropout, every row of the batch).
    def _add_delta(self, installer: Installer, site_key: str, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` plus the site's (gated, scaled) delta of ``x``; by the fused kernels where they compute it
        (a per-token gate or none, no dropout, every row of the batch)."""
        config = self.config
        gated = site_key in self.gates
        down_bias = self.adapters[site_key].down.bias  # (m,) in the weights' dtype, for every bottleneck type
        if x.shape == residual.shape and installer.row_mask() is None and self._fusable(site_key) \
                and (not gated or gate_per_token(config.gate_pooling, self.sites[site_key].causal)) \
                and not (self.dropout and self.training) \
                and fused.available(residual, down_bias.dtype, down_bias.shape[0], config.activation, gated):
            gate = self.gates[site_key].proj if gated else None
            # a parallel adapter's input may be a LayerNorm's float32 output: autocast's GEMM would cast it too
            return fused.bottleneck_add(cast_like(x, residual), None if residual is x else residual,
                                        *self._bottleneck_weights(site_key), config.activation, config.scaling,
                                        *((gate.weight, gate.bias) if gate is not None else (None, None)))
        delta = self._delta(site_key, x, installer.context.padding_mask)
        return residual + cast_like(installer.own_rows(delta), residual)

    def _fusable(self, site_key: str) -> bool:
        """Whether the site's bottleneck computes what :mod:`~unipelt.kernels.bottleneck` fuses, a plain
        ``f(x W_d^T + b_d) W_u^T + b_u`` (subclasses with bottlenecks of their own say whether theirs does)."""
        return type(self.adapters[site_key]) is Bottleneck

    def _bottleneck_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """``(W_down, b_down, W_up, b_up)`` as the fused kernels read them (subclasses may pad the ranks)."""
        return self._plain_weights(site_key)

"""LoRA (Hu et al. 2021): ``h = W x + (alpha / r) B A x``, B zero-initialised.

Reference: microsoft/LoRA ``loralib/layers.py`` (``Linear``: A Kaiming-uniform with a = sqrt(5), B zeros,
scaling alpha / r); defaults r = 8, alpha = 16 on W_q and W_v, no dropout, as its RoBERTa GLUE scripts
(``examples/NLU/roberta_base_*.sh``). The model starts as the base. Mergeable as ``W' = W + (alpha / r) B A``
unless gated (the gate depends on the input).
``fold=True`` trains the update inside the projection's own GEMM, ``x (W + (alpha / r) B A)^T``
(``Installer.add_weight_delta``): less GPU work per step at BERT-base (H100: 5.80 against 5.92 ms), more
host work before it; off by default.

With ``gate=True`` (UniPELT) the gate *replaces* alpha / r: ``h = W x + G_L B A x`` with ``G_L`` the mean over the
example's tokens of ``sigmoid(w_g . x_t + b_g)`` read from the projection's input (morningmoni/UniPELT
``transformers/models/bert/lora_layers.py`` L166-171; adapters ``methods/lora.py`` ``LoRA.forward``). q and v
of a self-attention read the same input, so this is one gate per layer with separate weights for q and v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig, register
from ..runtime import Gate, Installer, gate_values, shared_by_input, stacked_linear
from ..sites import ModelMap, Projection
from .base import DeltaMethod, add_up_projection, attention_input_groups, matmul_input


@register
@dataclass
class LoRAConfig(MethodConfig):
    method = "lora"
    description = "LoRA: low-rank update (alpha/r) B A added to chosen projections (default W_q, W_v)"
    gateable = True

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    # train the update inside the projection's own GEMM, x (W + s B A)^T: one weight-gradient GEMM per
    # projection instead of the rank-r path's four skinny GEMMs over the activations (not with gate or dropout)
    fold: bool = False
    # gated: "replace", the gate replaces alpha / r (UniPELT's); "alpha", G (alpha / r) B A x (unipelt_legacy's)
    gate_scaling: str = "replace"

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("r")
        if self.fold and (self.gate or self.dropout):
            raise ConfigError("lora fold=True computes x (W + s B A)^T, which cannot hold a gate or dropout on x; "
                              "drop fold, or the gate and dropout")
        if not self.targets:
            raise ConfigError("lora needs at least one target, e.g. targets=('q', 'v')")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.gate_scaling not in ("replace", "alpha"):
            raise ConfigError(f"lora gate_scaling must be 'replace' or 'alpha', got {self.gate_scaling!r}")


class LoRAPair(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.A = nn.Linear(in_features, r, bias=False)
        self.B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.B.weight @ self.A.weight


class LoRA(DeltaMethod):
    config_class = LoRAConfig
    serves_rows = True  # multi-task serving: acts on its task's rows of a batch only

    def __init__(self, config: LoRAConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.scaling = config.alpha / config.r
        self.sites: dict[str, Projection] = {}
        self.causal: dict[str, bool] = {}
        self.pairs = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for site_key, proj in model_map.projections(config.targets):
            self.causal[site_key] = model_map.causal(proj.module)
            if config.r > min(proj.in_features, proj.out_features):
                raise ConfigError(
                    f"lora rank r={config.r} does not fit {proj.path} ({proj.in_features} -> {proj.out_features}); "
                    f"use r <= {min(proj.in_features, proj.out_features)}"
                )
            self.sites[site_key] = proj
            self.pairs[site_key] = LoRAPair(proj.in_features, proj.out_features, config.r)
            if config.gate:
                self.gates[site_key] = Gate(proj.in_features)

    def scaled_delta(self, site_key: str) -> torch.Tensor:
        """``(alpha / r) B A``: what merge adds to W, and what ``fold=True`` adds to it per call."""
        return self.pairs[site_key].delta_weight() * self.scaling

    def install(self, installer: Installer) -> None:
        if self.config.fold:
            for site_key, proj in self.sites.items():
                installer.add_weight_delta(proj, lambda site_key=site_key: self.scaled_delta(site_key),
                                           self._hook(site_key, proj, installer))
            return
        # Sites of one attention (q, v, ...) usually read the same input tensor: their A's and gates then
        # run as one GEMM over it (one read of x, one gradient back into x instead of one per site).
        for group in attention_input_groups(self.sites):
            fused = self._fused_reader(group, installer.context.values) \
                if len(group) > 1 and not self.config.dropout else None
            for site_key in group:
                installer.on_output(self.sites[site_key].module,
                                    self._hook(site_key, self.sites[site_key], installer, fused))

    def _fused_reader(self, group: list[str], cache: dict):
        """``read(site_key, x) -> (A x, gate pre-activation or None)`` computed once per input for the group.

        The first site of the group to see an input computes ``x [A_1; ...; A_n; w_g1; ...; w_gn]^T``
        (``shared_by_input``); the others take their columns.
        """
        r, n = self.config.r, len(group)
        gated = all(k in self.gates for k in group)
        column = {k: i for i, k in enumerate(group)}

        def compute(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            weights = [self.pairs[k].A.weight for k in group]
            biases = None
            if gated:
                weights += [self.gates[k].proj.weight for k in group]
                biases = [x.new_zeros(n * r, dtype=weights[0].dtype), *[self.gates[k].proj.bias for k in group]]
            return stacked_linear(x, weights, biases, [r] * n + [1] * (n if gated else 0))

        shared = shared_by_input(cache, (id(self), group[0]), n, compute)

        def read(site_key: str, x: torch.Tensor):
            parts, i = shared(x), column[site_key]
            return parts[i], (parts[n + i] if gated else None)

        return read

    def _hook(self, site_key: str, proj: Projection, installer: Installer, fused=None):
        pair = self.pairs[site_key]
        gate = self.gates[site_key] if site_key in self.gates else None  # noqa: SIM401 (ModuleDict has no get)
        a, b = pair.A.weight, pair.B.weight
        scaling, p = self.scaling, self.config.dropout
        pooling, causal, own_rows = self.config.gate_pooling, self.causal[site_key], installer.own_rows
        gated_scaling = scaling if self.config.gate_scaling == "alpha" else 1.0

        # Per call: one GEMM for A x (shared with the group's other sites, see _fused_reader), one for
        # output + s B (A x) (the add rides in the GEMM); weights are used directly, without module calls,
        # since at small batches Python per op is the cost.
        def add_lora(module, inputs, output):
            x = inputs[0]
            gate_logit = None
            if fused is not None:
                h, gate_logit = fused(site_key, x)
            else:
                xd = torch.nn.functional.dropout(x, p, self.training) if p else x
                h = torch.nn.functional.linear(matmul_input(xd, a), a)
            h = own_rows(h)  # multi-task serving: A x zero on other tasks' rows, so is their delta
            if gate is not None:
                logit = gate_logit if gate_logit is not None else gate.logits(x)
                g = gate_values(logit, pooling, installer.context.padding_mask, causal)
                # one scalar per example (or token): scaling the rank-r rows of A x is the same as scaling the
                # d-wide delta, at a fraction of the traffic; the gate replaces alpha / r, the add rides in the GEMM
                return add_up_projection(output, h * g, b, gated_scaling, proj)
            return add_up_projection(output, h, b, scaling, proj)

        return add_lora

    def mergeable(self) -> bool:
        return not self.config.gate

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(self.scaled_delta(site_key))

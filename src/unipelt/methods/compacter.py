"""Compacter, Compacter++ and PHM-Adapter (Karimi Mahabadi et al., NeurIPS 2021).

Bottleneck adapters whose two projections are parameterised hypercomplex multiplication (PHM)
layers: ``W = sum_{i=1..n} A_i (x) B_i`` (Kronecker products), ``A_i`` n x n, ``B_i`` (out/n) x (in/n).

- ``compacter``: the ``A_i`` ("slow" weights) are one set shared by every PHM layer of the model;
  each layer's ``B_i = s_i t_i^T`` has rank ``phm_rank`` (1 in the paper); Houlsby placement.
- ``compacter++``: the same, one adapter per layer after the FFN (Pfeiffer placement).
- ``phm_adapter``: each PHM layer has its own ``A_i`` and full ``B_i``; Houlsby placement.

Everything else is a bottleneck adapter's (placement, parallel, scaling, UniPELT gate): the up
projection's fast weights (``t_i``, or ``B_i``) and bias start at zero, so the model starts as the
base model. ``W`` is built per call from the factors (``n * out * in`` multiply-adds, small beside
the GEMM) and the GEMMs run on it. The down projection is initialised with ``nn.Linear``'s variance
(``A_i ~ N(0, 1/n)``, factors scaled to match). Not mergeable (non-linearity).

Parameters: shared ``n^3``, plus per PHM layer ``r (out + in) + out`` (rank r) or ``n^3 + out in / n +
out`` (PHM-Adapter); with ``m`` the bottleneck and ``d`` the width, a Compacter adapter has
``3 (d + m)`` at rank 1. Sizes must divide by ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, register, register_preset
from ..kernels import bottleneck as fused
from ..runtime import Installer
from .adapter import Adapter, AdapterConfig
from .base import activation, matmul_input


@register
@dataclass
class CompacterConfig(AdapterConfig):
    method = "compacter"
    description = "Compacter: adapters of PHM layers, shared n x n rules, rank-1 factors (Karimi Mahabadi 2021)"

    bottleneck: int = 24  # the paper's reduction factor 32 on a 768-wide model
    placement: str = "houlsby"
    activation: str = "gelu"
    n: int = 4
    phm_rank: int | None = 1  # None: full B_i (PHM-Adapter)
    shared_rules: bool = True  # one set of A_i for the whole model

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("n")
        if self.phm_rank is not None and (not isinstance(self.phm_rank, int) or self.phm_rank < 1):
            raise ConfigError(f"compacter phm_rank must be a positive integer or None (full), got {self.phm_rank!r}")
        if self.bottleneck % self.n:
            near = max(self.n, self.bottleneck // self.n * self.n)
            raise ConfigError(f"compacter bottleneck {self.bottleneck} is not divisible by n={self.n}; "
                              f"use a multiple of {self.n}, e.g. bottleneck={near}")


register_preset("compacter++", CompacterConfig, "Compacter++: one Compacter adapter per layer, after the FFN",
                placement="pfeiffer")
register_preset("phm_adapter", CompacterConfig, "PHM-Adapter: adapters of PHM layers with own rules and full factors",
                phm_rank=None, shared_rules=False)


class PHMLinear(nn.Module):
    """``y = x W^T + b`` with ``W = sum_i A_i (x) B_i``; the rules ``A`` are passed in when shared."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None, own_rules: bool, zero: bool):
        super().__init__()
        p, q = out_features // n, in_features // n
        self.shape = (n, p, q)
        self.rules = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n)) if own_rules else None
        # Var(W) = n Var(A) Var(B) = Var(B) with Var(A) = 1/n: B gets nn.Linear's 1 / (3 in)
        target = 1.0 / (3.0 * in_features)
        if rank is None:
            self.B = nn.Parameter(torch.zeros(n, p, q) if zero else torch.randn(n, p, q) * math.sqrt(target))
            self.s = self.t = None
        else:
            factor = (target / rank) ** 0.25  # Var(s t^T) = rank Var(s) Var(t)
            self.B = None
            self.s = nn.Parameter(torch.randn(n, p, rank) * factor)
            self.t = nn.Parameter(torch.zeros(n, rank, q) if zero else torch.randn(n, rank, q) * factor)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self, shared_rules: torch.Tensor | None) -> torch.Tensor:
        rules = self.rules if self.rules is not None else shared_rules
        return kron_sum(rules, self.B if self.B is not None else self.s @ self.t)

    def layout(self) -> tuple:
        """PHM layers with equal layouts build their weights in one batch (:func:`batched_weights`)."""
        factors = (self.B,) if self.B is not None else (self.s, self.t)
        return (self.rules is not None, *(tuple(f.shape) for f in factors))


def kron_sum(rules: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i (x) B_i`` for rules ``A`` ([S,] n, n, n) and factors ``B`` ([S,] n, p, q): ([S,] n p, n q)."""
    n, p, q = factors.shape[-3:]
    # (A (x) B)[(a, c), (b, d)] = A[a, b] B[c, d], summed over the n pairs; a leading S broadcasts (shared rules)
    kron = torch.einsum("...iab,...icd->...acbd", rules.to(factors.dtype), factors)
    return kron.reshape(*kron.shape[:-4], n * p, n * q)


def batched_weights(layers: list[PHMLinear], shared_rules: torch.Tensor | None,
                    pad: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Every layer's ``W`` (all of one :meth:`PHMLinear.layout`) from one stacked computation; ``pad``: zeros
    appended to the stacked weights as ``F.pad`` takes them (in the build's kernel, not one per layer)."""
    first = layers[0]
    if first.B is not None:
        factors = torch.stack([layer.B for layer in layers])
    else:
        factors = torch.stack([layer.s for layer in layers]) @ torch.stack([layer.t for layer in layers])
    rules = torch.stack([layer.rules for layer in layers]) if first.rules is not None else shared_rules
    weights = kron_sum(rules, factors)
    return list((F.pad(weights, pad) if any(pad) else weights).unbind(0))


class PHMBottleneck(nn.Module):
    def __init__(self, d: int, m: int, config: CompacterConfig):
        super().__init__()
        own = not config.shared_rules
        self.down = PHMLinear(d, m, config.n, config.phm_rank, own, zero=False)
        self.up = PHMLinear(m, d, config.n, config.phm_rank, own, zero=True)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor, shared_rules: torch.Tensor | None,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``weights``: this bottleneck's (W_down, W_up) built beforehand; else built here."""
        w_down, w_up = weights if weights is not None else (self.down.weight(shared_rules),
                                                            self.up.weight(shared_rules))
        h = self.act(F.linear(matmul_input(x, w_down), w_down, self.down.bias))
        return F.linear(h, w_up, self.up.bias)


class Compacter(Adapter):
    config_class = CompacterConfig

    def _bottleneck(self, d: int) -> nn.Module:
        config: CompacterConfig = self.config
        if d % config.n:
            raise ConfigError(f"compacter needs the model width divisible by n: {d} is not divisible by n={config.n}; "
                              f"choose n among {[k for k in range(1, 9) if d % k == 0 and config.bottleneck % k == 0]}")
        if config.shared_rules and getattr(self, "rules", None) is None:
            self.rules = nn.Parameter(torch.randn(config.n, config.n, config.n) / math.sqrt(config.n))
        return PHMBottleneck(d, config.bottleneck, config)

    def install(self, installer: Installer) -> None:
        self._context = installer.context  # its per-pass cache: the weights are built once per forward pass
        super().install(installer)

    def _all_weights(self, rank_pad: int = 0, pad_up: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every site's (W_down, W_up), the PHM layers of each layout built together; ``rank_pad`` zero ranks
        appended to W_down's rows and, with ``pad_up``, to W_up's columns, in the build's kernel."""
        layers = [(key, part, getattr(b, part)) for key, b in self.adapters.items() for part in ("down", "up")]
        groups: dict[tuple, list] = {}
        for entry in layers:
            groups.setdefault((entry[1], entry[2].layout()), []).append(entry)
        built: dict[tuple[str, str], torch.Tensor] = {}
        for (part, _), group in groups.items():
            pad = (0, 0, 0, rank_pad) if part == "down" else (0, rank_pad if pad_up else 0)
            weights = batched_weights([layer for _, _, layer in group], getattr(self, "rules", None), pad)
            built.update({(key, part): w for (key, part, _), w in zip(group, weights, strict=True)})
        return {key: (built[(key, "down")], built[(key, "up")]) for key in self.adapters}

    def _aligned_weights(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """Every site's (W_down, b_down, W_up, b_up) for the fused kernels, ranks padded as
        :func:`~unipelt.kernels.bottleneck.aligned_ranks` pads them (gated: W_down with room for the gate's row, W_up
        as it is), in one padding kernel per tensor kind."""
        gated = bool(self.gates)
        pad = fused.rank_padding(self.config.bottleneck, gated=gated)
        weights = self._all_weights(pad, pad_up=not gated)
        biases = [b.down.bias for b in self.adapters.values()]
        if pad:
            biases = F.pad(torch.stack(biases), (0, pad)).unbind(0)
        return {key: (weights[key][0], b_down, weights[key][1], bottleneck.up.bias)
                for (key, bottleneck), b_down in zip(self.adapters.items(), biases, strict=True)}

    def _built_weights(self, site_key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The site's (W_down, W_up) from this pass's one batched build; None outside an installed model, and under
        gradient checkpointing, where each layer builds its own."""
        context = getattr(self, "_context", None)
        if context is None or context.per_layer:
            return None
        return context.once((id(self), "phm_weights"), self._all_weights, uses=len(self.adapters))[site_key]

    def _fusable(self, site_key: str) -> bool:
        return True

    def _bottleneck_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """The fused kernels' weights, ranks already aligned: this pass's one padded build for every site."""
        # called from install's hooks: the context is there
        return self._context.once((id(self), "phm_aligned"), self._aligned_weights,
                                  uses=len(self.adapters))[site_key]

    def _plain_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """The site's (W_down, b_down, W_up, b_up), W from this pass's one batched build (built here outside a
        forward pass)."""
        bottleneck = self.adapters[site_key]
        built = self._built_weights(site_key)
        w_down, w_up = built if built is not None else (bottleneck.down.weight(getattr(self, "rules", None)),
                                                        bottleneck.up.weight(getattr(self, "rules", None)))
        return w_down, bottleneck.down.bias, w_up, bottleneck.up.bias

"""Compacter, Compacter++ and PHM-Adapter (Karimi Mahabadi et al., NeurIPS 2021).

``A(x) = W_up f(W_down x + b_down) + b_up`` with each ``W`` a parameterised hypercomplex multiplication (PHM)
layer, ``W = sum_{i=1..n} A_i (x) B_i`` (Kronecker products), ``A_i`` n x n, ``B_i`` (out/n) x (in/n), added as a
serial adapter ``h + A(h)`` (placement, parallel, scaling and UniPELT gate as ``adapter``'s).
Reference: rabeehk/compacter@e123daa, ``seq2seq/hypercomplex/layers.py`` (``PHMLinear``: ``H = sum_i
kron(A_i, W_i)``, ``y = x H + b``, the same function as ours with ``A`` and ``W`` transposed) and the recipes
``seq2seq/configs/compacter.json``, ``compacter++.json``, ``phm_adapters.json``.

- ``compacter``: the ``A_i`` ("rules") are one set shared by every PHM layer of the model (the reference's
  ``shared_phm_rule``, ``third_party/models/t5/modeling_t5.py`` 1533-1560); each layer's ``B_i = s_i t_i^T``
  has rank ``phm_rank`` (1, ``factorized_phm``); ``n = 4``; Houlsby placement: after every self-attention
  and after the FFN, with no adapter after an encoder-decoder's cross-attention (``modeling_t5.py``: adapters
  in ``T5LayerSelfAttention`` and ``T5LayerFF``, none in ``T5LayerCrossAttention``; ``cross_attention=True``
  adds one there).
- ``compacter++``: the same, one adapter per layer after the FFN (``add_adapter_in_self_attention: false``).
- ``phm_adapter``: each PHM layer has its own ``A_i`` and full ``B_i``; ``n = 12`` (``phm_adapters.json``).

The recipe's other settings are the defaults here:

- bottleneck ``m = d / 32`` (``task_reduction_factor: 32``: 24 on a 768-wide model), rounded down to a
  multiple of ``n`` (at least ``n``) where it is not one; ``bottleneck`` sets it outright;
- initialisation (``hypercomplex_nonlinearity: glorot-uniform``, ``phm_c_init: normal``): shared rules
  ``A ~ N(0, 1e-4^2)`` (``phm_init_range``), a PHM-Adapter layer's own rules ``N(0, 0.01^2)`` (``layers.py``
  ``reset_parameters``); every fast factor, of the down **and** the up projection alike, Xavier-uniform with
  gain sqrt 2 per slice: ``s_i``, ``t_i`` (or ``B_i``) ~ U(-a, a), ``a = sqrt 2 sqrt(6 / (rows + cols))`` of
  the slice (``inits.py`` ``glorot_uniform``); biases zero. ``W`` then has entries of order 1e-5: the model
  starts near the base model, not exactly at it (``init="lora"``: the up projection's ``t_i`` or ``B_i`` start
  at zero instead, so ``W_up = 0`` and the model starts exactly as the base model);
- ``train_layer_norms`` (``unfreeze_layer_norms: true``): every LayerNorm (RMSNorm) of the pretrained body
  trains too, as ``ln`` tuning's gains and biases starting at the base values (``utils/utils.py``
  ``unfreeze_layer_norms``), counted and saved with this method (the tuned values themselves);
- learning rate 3e-3 (``reference_lr``) for every part, as the recipes' one ``learning_rate``.

Not here: the recipe's ``gelu_new`` (tanh approximation; ours is the exact GELU). ``W`` is built per
forward pass from the factors, all layers of one layout in one batch (``n * out * in`` multiply-adds, small
beside the GEMM), and the GEMMs run on it. Not mergeable (non-linearity).

Parameters: shared ``n^3``, plus per PHM layer ``r (out + in) + out`` (rank r) or ``n^3 + out in / n + out``
(PHM-Adapter); a Compacter adapter has ``3 (d + m)`` at rank 1; plus the body's norms' gains and biases with
``train_layer_norms``. Sizes must divide by ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..kernels import bottleneck as fused
from ..registry import Preset, register_method
from ..runtime import Installer
from ..sites import ModelMap
from .adapter import Adapter, AdapterConfig
from .base import activation, matmul_input
from .ln_tuning import LNConfig, LNTuning


@dataclass
class CompacterConfig(AdapterConfig):
    method = "compacter"
    description = "Compacter: adapters of PHM layers, shared n x n rules, rank-1 factors (Karimi Mahabadi 2021)"
    reference_lr: ClassVar[float | None] = 3e-3  # compacter.json, compacter++.json, phm_adapters.json

    bottleneck: int | None = None  # None: d / 32 (the reference's reduction factor 32), a multiple of n
    placement: str = "houlsby"
    activation: str = "gelu"
    n: int = 4
    phm_rank: int | None = 1  # None: full B_i (PHM-Adapter)
    shared_rules: bool = True  # one set of A_i for the whole model
    train_layer_norms: bool = True  # the body's LayerNorms train too (the reference's unfreeze_layer_norms)
    cross_attention: bool = False  # houlsby/attention placement: an adapter after a decoder's cross-attention too
    init: str | None = None  # None or "bert": the reference's; "lora": the up projection's t (B) zero, W_up = 0

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("n")
        if self.phm_rank is not None and (not isinstance(self.phm_rank, int) or self.phm_rank < 1):
            raise ConfigError(f"compacter phm_rank must be a positive integer or None (full), got {self.phm_rank!r}")
        if self.phm_rank is not None:
            self.require_positive_ints("phm_rank")  # and not beyond any model's size
        if self.bottleneck is not None and self.bottleneck % self.n:
            near = max(self.n, self.bottleneck // self.n * self.n)
            raise ConfigError(f"compacter bottleneck {self.bottleneck} is not divisible by n={self.n}; "
                              f"use a multiple of {self.n}, e.g. bottleneck={near}")
        for name in ("train_layer_norms", "cross_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compacter {name} must be true or false, got {getattr(self, name)!r}")

    def width(self, d: int) -> int:
        """``m``: ``bottleneck``, else ``d / 32`` rounded down to a multiple of ``n`` (at least ``n``)."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(self.n, d // 32 // self.n * self.n)


SHARED_RULE_STD = 1e-4  # compacter.json phm_init_range
OWN_RULE_STD = 0.01  # hypercomplex/layers.py reset_parameters, phm_c_init "normal"
FACTOR_GAIN = math.sqrt(2.0)  # hypercomplex/inits.py glorot_uniform


class PHMLinear(nn.Module):
    """``y = x W^T + b`` with ``W = sum_i A_i (x) B_i``; the rules ``A`` are passed in when shared."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None, own_rules: bool,
                 zero: bool = False):
        super().__init__()
        p, q = out_features // n, in_features // n
        self.shape = (n, p, q)
        self.rules = nn.Parameter(torch.randn(n, n, n) * OWN_RULE_STD) if own_rules else None
        if rank is None:  # ``zero``: B (or t) starts at zero, so W does
            self.B = nn.Parameter(torch.zeros(n, p, q) if zero else xavier_slices(torch.empty(n, p, q)))
            self.s = self.t = None
        else:
            self.B = None
            self.s = nn.Parameter(xavier_slices(torch.empty(n, p, rank)))
            self.t = nn.Parameter(torch.zeros(n, rank, q) if zero else xavier_slices(torch.empty(n, rank, q)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self, shared_rules: torch.Tensor | None) -> torch.Tensor:
        rules = self.rules if self.rules is not None else shared_rules
        return kron_sum(rules, self.B if self.B is not None else self.s @ self.t)

    def layout(self) -> tuple:
        """PHM layers with equal layouts build their weights in one batch (:func:`batched_weights`)."""
        factors = (self.B,) if self.B is not None else (self.s, self.t)
        return (self.rules is not None, *(tuple(f.shape) for f in factors))


@torch.no_grad()
def xavier_slices(factors: torch.Tensor) -> torch.Tensor:
    """Each slice ``factors[i]`` (rows x cols) ~ U(-a, a), ``a = sqrt 2 sqrt(6 / (rows + cols))``: Xavier-uniform
    with gain sqrt 2, the reference's ``glorot_uniform`` per slice."""
    for piece in factors:
        nn.init.xavier_uniform_(piece, gain=FACTOR_GAIN)
    return factors


def kron_sum(rules: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i (x) B_i`` for rules ``A`` ([S,] n, n, n) and factors ``B`` ([S,] n, p, q): ([S,] n p, n q)."""
    n, p, q = factors.shape[-3:]
    # (A (x) B)[(a, c), (b, d)] = A[a, b] B[c, d], summed over the n pairs; a leading S broadcasts (shared rules)
    kron = torch.einsum("...iab,...icd->...acbd", rules.to(factors.dtype), factors)
    return kron.reshape(*kron.shape[:-4], n * p, n * q)


class PHMBottleneck(nn.Module):
    def __init__(self, d: int, m: int, config: CompacterConfig):
        super().__init__()
        own = not config.shared_rules
        self.down = PHMLinear(d, m, config.n, config.phm_rank, own)
        self.up = PHMLinear(m, d, config.n, config.phm_rank, own, zero=config.init == "lora")
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor, shared_rules: torch.Tensor | None,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``weights``: this bottleneck's (W_down, W_up) built beforehand; else built here."""
        w_down, w_up = weights if weights is not None else (self.down.weight(shared_rules),
                                                            self.up.weight(shared_rules))
        h = self.act(F.linear(matmul_input(x, w_down), w_down, self.down.bias))
        return F.linear(h, w_up, self.up.bias)


# --- speed path: every PHM layer of one layout built in one batched computation (the same ``W`` as each
# layer's :meth:`PHMLinear.weight`), ranks padded for the fused kernels in the same kernel.
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


@register_method(CompacterConfig, presets={
    "compacter++": Preset("Compacter++: one Compacter adapter per layer, after the FFN", placement="pfeiffer"),
    "phm_adapter": Preset("PHM-Adapter: adapters of PHM layers with own rules and full factors",
                          phm_rank=None, shared_rules=False, n=12),
})
class Compacter(Adapter):
    def __init__(self, config: CompacterConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        if not config.cross_attention:  # the reference has no adapter after a cross-attention
            for site_key in [k for k in self.sites if k.endswith("_cross_attn")]:
                del self.sites[site_key], self.adapters[site_key]
                if site_key in self.gates:
                    del self.gates[site_key]
        self.layer_norms = LNTuning(LNConfig(), model_map) if config.train_layer_norms else None

    def _bottleneck(self, d: int) -> nn.Module:
        config: CompacterConfig = self.config
        m = self.bottleneck
        if d % config.n or m % config.n:
            raise ConfigError(f"compacter needs the model width divisible by n: {d} is not divisible by n={config.n}; "
                              f"choose n among {[k for k in range(1, 9) if d % k == 0 and m % k == 0]}")
        if config.shared_rules and getattr(self, "rules", None) is None:
            self.rules = nn.Parameter(torch.randn(config.n, config.n, config.n) * SHARED_RULE_STD)
        return PHMBottleneck(d, m, config)

    def install(self, installer: Installer) -> None:
        self._context = installer.context  # its per-pass cache: the weights are built once per forward pass
        super().install(installer)
        if self.layer_norms is not None:
            self.layer_norms.install(installer)

    def _plain_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        """The site's (W_down, b_down, W_up, b_up), each ``W = sum_i A_i (x) B_i`` (:meth:`PHMLinear.weight`): in a
        forward pass taken from this pass's one batched build (the speed path below), built here outside one."""
        bottleneck = self.adapters[site_key]
        built = self._built_weights(site_key)
        w_down, w_up = built if built is not None else (bottleneck.down.weight(getattr(self, "rules", None)),
                                                        bottleneck.up.weight(getattr(self, "rules", None)))
        return w_down, bottleneck.down.bias, w_up, bottleneck.up.bias

    # --- speed path: every site's W_down and W_up built together, once per forward pass, in one batched Kronecker
    # sum per layout (:func:`batched_weights`: each W the same as its ``PHMLinear.weight``), and the fused bottleneck
    # kernels' weights with their ranks padded by zeros in the same build.
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
        pad = fused.rank_padding(self.bottleneck, gated=gated)
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

"""KronA (Edalati et al. 2022): a Kronecker-product update of chosen projections.

``h = W x + s (A (x) B) x`` with ``A``: a_out x a_in and ``B``: (d_out / a_out) x (d_in / a_in), on
W_q and W_v by default.
Reference: none in code. The authors released no implementation (PapersWithCode
lists none; only third-party re-implementations exist), and the paper's body (arXiv 2212.10650, "KronA:
Parameter Efficient Tuning with Kronecker Adapter") could not be read here, only its abstract; so no choice
below cites a section, and each says where it comes from:

- the update ``A (x) B`` parallel to the projection, as "a Kronecker equivalent of LoRA", on T5 for GLUE:
  the abstract; W_q and W_v as the targets follow LoRA's default (unverified against the paper);
- ``A = 0`` and ``B`` Kaiming-uniform like ``nn.Linear``, so the model starts as the base model: this
  library's choice, the convention of peft's LoKr (``lokr_w1`` zeros, ``lokr_w2`` Kaiming;
  peft ``tuners/lokr/layer.py``), a related method with code;
- ``a_out = a_in = 32`` and ``s = 1``: this library's choice (unverified);
- ``krona_ffn`` (KronA^B, an adapter parallel to the FFN block) and its ``residual_scale`` (KronA^B_res):
  named in secondary descriptions of the paper, which call the residual learnable; here it is a fixed
  scale (unverified either way).

Trained inside the projection's own GEMM, ``x (W + s A (x) B)^T`` (``Installer.add_weight_delta``):
forming the d_out x d_in product costs as many multiplies as one token's GEMM row, and the step then pays
one weight-gradient GEMM, where the vec trick (``(A (x) B) vec(X) = vec(A X B^T)``, X the input as
(a_in, d_in / a_in)) runs small batched GEMMs over the activations in both passes (1.49x the frozen
model's compiled step at BERT-base, H100). The vec trick serves gated sites and rows of several tasks.
Mergeable: ``W' = W + s A (x) B``. Parameters per matrix: ``a_out a_in + (d_out / a_out)(d_in / a_in)``;
the sizes must divide.

``krona_ffn`` is KronA^B: the same Kronecker update as an adapter parallel to the FFN block,
``h <- FFN(x) + s (A (x) B) x`` with ``x`` the block's input (d x d, so ``a_out`` and ``a_in`` divide d).
With ``residual_scale = c`` it is KronA^B_res: ``h <- FFN(x) + s (A (x) B) x + c x``, a fixed scaled
residual around the block (not the identity at init unless c = 0). Not mergeable (the FFN between its
input and output is non-linear). Parameters per layer: ``a_out a_in + (d / a_out)(d / a_in)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Gate, Installer, gate_values
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input


@dataclass
class KronAConfig(MethodConfig):
    method = "krona"
    description = "KronA: Kronecker-product update A (x) B of chosen projections (default W_q, W_v), mergeable"
    gateable = True

    a_out: int = 32  # rows of A; d_out / a_out rows of B
    a_in: int = 32  # columns of A; d_in / a_in columns of B
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "v")
    layers: tuple[int, ...] | None = None  # only sites in these layers (index within each stack); None: every one
    exclude: tuple[str, ...] = ()  # sites to leave out: role names, module names or "re:" patterns

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("a_out", "a_in")
        if not self.targets:
            raise ConfigError("krona needs at least one target, e.g. targets=('q', 'v')")


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(A (x) B) x`` over the last dimension of ``x`` without forming the Kronecker product."""
    a_out, a_in = a.shape
    b_out, b_in = b.shape
    grid = x.reshape(*x.shape[:-1], a_in, b_in)  # X with vec(X) = x, row-major
    y = torch.matmul(torch.matmul(a, grid), b.t())  # A X B^T: (..., a_out, b_out)
    return y.reshape(*x.shape[:-1], a_out * b_out)


def kron_factors(a_out: int, a_in: int, d_out: int, d_in: int, where: str) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` (a_out x a_in, zeros: the update starts at zero) and ``B`` (d_out/a_out x d_in/a_in, Kaiming-uniform)."""
    if d_out % a_out or d_in % a_in:
        raise ConfigError(f"{where} ({d_in} -> {d_out}): the factors do not fit: a_out={a_out} must divide {d_out} "
                          f"and a_in={a_in} must divide {d_in}")
    b = torch.empty(d_out // a_out, d_in // a_in)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return nn.Parameter(torch.zeros(a_out, a_in)), nn.Parameter(b)


@register_method(KronAConfig)
class KronA(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True

    def __init__(self, config: KronAConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: dict[str, Projection] = {}
        self.causal: dict[str, bool] = {}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.gates = nn.ModuleDict()
        for site_key, proj in model_map.projections(config.targets, config.layers, config.exclude):
            self.sites[site_key] = proj
            self.causal[site_key] = model_map.causal(proj.module)
            self.A[site_key], self.B[site_key] = kron_factors(config.a_out, config.a_in, proj.out_features,
                                                              proj.in_features, f"krona on {proj.path}")
            if config.gate:
                self.gates[site_key] = Gate(proj.in_features)

    def delta_weight(self, site_key: str) -> torch.Tensor:
        """``s A (x) B`` as (d_out, d_in)."""
        w = torch.kron(self.A[site_key], self.B[site_key])
        return w * self.config.scale if self.config.scale != 1.0 else w

    def _hook(self, site_key: str, proj: Projection, installer: Installer):
        scale = self.config.scale
        gate = self.gates[site_key] if site_key in self.gates else None  # noqa: SIM401 (ModuleDict has no get)
        pooling, causal = self.config.gate_pooling, self.causal[site_key]

        def add_kron(module, inputs, output):
            a, b = self.A[site_key], self.B[site_key]  # read per call (FSDP swaps parameters each forward)
            x = inputs[0]
            delta = kron_apply(matmul_input(x, a), a, b)
            delta = delta * scale if scale != 1.0 else delta
            if gate is not None:
                delta = delta * gate_values(gate.logits(x), pooling, installer.context.padding_mask, causal)
            return output + proj.place(cast_like(installer.own_rows(delta), output))

        return add_kron

    def install(self, installer: Installer) -> None:
        for site_key, proj in self.sites.items():
            hook = self._hook(site_key, proj, installer)
            if site_key in self.gates:  # the gate depends on the input: a delta on the output only
                installer.on_output(proj.module, hook)
            else:  # speed path, in the projection's own GEMM: the vec trick's batched GEMMs cost more (BERT-base, H100)
                installer.add_weight_delta(proj, lambda site_key=site_key: self.delta_weight(site_key), hook)

    def mergeable(self) -> bool:
        return not self.config.gate

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(self.delta_weight(site_key))


@dataclass
class KronAFFNConfig(MethodConfig):
    method = "krona_ffn"
    description = "KronA^B: a Kronecker adapter parallel to the FFN; residual_scale > 0 gives KronA^B_res"
    gateable = True

    a_out: int = 32
    a_in: int = 32
    scale: float = 1.0
    residual_scale: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("a_out", "a_in")


@register_method(KronAFFNConfig)
class KronAFFN(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True

    def __init__(self, config: KronAFFNConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.layers = {layer.key: layer for layer in model_map.layers}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.gates = nn.ModuleDict()
        for key, layer in self.layers.items():
            d_in, d_out = layer.ffn_in[0].in_features, layer.ffn_out.out_features
            self.A[key], self.B[key] = kron_factors(config.a_out, config.a_in, d_out, d_in, f"krona_ffn on {key}'s FFN")
            if config.gate:
                self.gates[key] = Gate(d_in)

    def install(self, installer: Installer) -> None:
        stash = installer.context.values
        for key, layer in self.layers.items():
            slot = (id(self), key)

            def read_input(module, inputs, slot=slot):
                stash[slot] = inputs[0]

            installer.on_input(layer.ffn_in[0].module, read_input)
            installer.on_output(layer.ffn_out.module, self._hook(key, layer.ffn_out, slot, stash, installer))

    def _hook(self, key: str, proj: Projection, slot: tuple, stash: dict, installer: Installer):
        gate = self.gates[key] if key in self.gates else None  # noqa: SIM401
        scale, residual = self.config.scale, self.config.residual_scale
        pooling, causal = self.config.gate_pooling, self.layers[key].causal

        def add_parallel(module, inputs, output):
            a, b = self.A[key], self.B[key]  # read per call (FSDP swaps parameters each forward)
            x = stash.pop(slot, None)
            if x is None:
                raise RuntimeError(f"krona_ffn {key}: the FFN input was not seen before its output")
            x_in = matmul_input(x, a)
            delta = kron_apply(x_in, a, b)
            delta = delta * scale if scale != 1.0 else delta
            if residual:
                delta = delta + residual * x_in
            if gate is not None:
                delta = delta * gate_values(gate.logits(x), pooling, installer.context.padding_mask, causal)
            return output + proj.place(cast_like(installer.own_rows(delta), output))

        return add_parallel

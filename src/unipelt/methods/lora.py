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

Options (``s = alpha / r``, ``W`` as ``(out, in)``, ``||V||_c`` the vector of the norms of V's rows, one per
output unit, over the inputs):

- ``dora=True``, DoRA (Liu et al. 2024, arXiv 2402.09353, Eq. 5; NVlabs/DoRA, peft ``tuners/lora/dora.py``
  ``DoraLinearLayer``): ``W' = m * (W + s B A) / ||W + s B A||_c`` with a trained magnitude ``m`` (one per
  output unit), started at ``||W||_c`` so the model starts as the base. As the paper's Section 4.3 suggests and
  peft does, the norm is a constant to the gradient (``detach``): ``m`` and ``B A`` get gradients through
  ``W' x`` only. On the output ``y = W x + b``: ``y + (m / n - 1)(W x) + (m / n) s B A x``, peft's form
  (with dropout, ``W D(x)`` in the middle term, as peft). Mergeable: ``W <- W'``. Not with a gate.
- ``init="pissa"`` (Meng et al. 2024, arXiv 2404.02948; GraphPKU/PiSSA, peft ``LoraLayer.pissa_init``):
  ``W = U S V^T``, ``A = S_r^{1/2} V_r^T / sqrt(s)``, ``B = U_r S_r^{1/2} / sqrt(s)`` (peft divides ``S_r`` by
  ``s``), so ``s B A`` is W's principal rank-r part.
- ``init="olora"`` (Buyukakyuz 2024, arXiv 2406.01775; peft ``LoraLayer.olora_init``): ``W = Q R``,
  ``B = Q[:, :r]``, ``A = R[:r]`` (no division by ``s``, as peft). peft factors the weight as stored, which for
  GPT-2's Conv1D is ``(in, out)``; here always ``(out, in)``.

PiSSA and OLoRA train on the residual ``W_res = W - s B_0 A_0`` (``B_0, A_0`` the initial factors). peft
writes ``W_res`` into the base weight; here the base weight stays untouched: ``B_0, A_0`` are frozen buffers
and the update is ``s (B A - B_0 A_0)``, computed as the rank-2r product ``s [B - B_0, B_0] [A; A - A_0]``, whose
second halves are exactly zero at init: the model starts as the base bit for bit, the update never subtracts two
large principal parts, its gradients are those of ``s B A``, and ``detach`` leaves ``W`` exactly as it was
(``W x + s (B A - B_0 A_0) x`` is peft's ``W_res x + s B A x`` to rounding). Merge adds ``s (B A - B_0 A_0)``;
save stores ``A_0, B_0`` with ``A, B``. With dropout the trained part reads ``D(x)``, the correction ``x``, as
peft's ``W_res x + s B A D(x)``. With ``dora=True`` the norm and the rescale are of ``W + s (B A - B_0 A_0)``,
which is peft's ``W_res + s B A``. ``export_peft`` writes them as peft saves them (A, B and
``init_lora_weights``; peft's loader recomputes ``W_res`` from the base) or, with ``convert_to_lora=True``, as
the rank-2r plain LoRA that peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Gate, Installer, gate_values, shared_by_input, stacked_linear
from ..sites import ModelMap, Projection
from .base import DeltaMethod, add_up_projection, attention_input_groups, cast_like, matmul_input

LORA_INITS = ("lora", "pissa", "olora")


@dataclass
class LoRAConfig(MethodConfig):
    method = "lora"
    description = "LoRA: low-rank update (alpha/r) B A added to chosen projections (default W_q, W_v)"
    gateable = True

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    layers: tuple[int, ...] | None = None  # only sites in these layers (index within each stack); None: every one
    exclude: tuple[str, ...] = ()  # sites to leave out: role names, module names or "re:" patterns
    dropout: float = 0.0
    # train the update inside the projection's own GEMM, x (W + s B A)^T: one weight-gradient GEMM per
    # projection instead of the rank-r path's four skinny GEMMs over the activations (not with gate or dropout)
    fold: bool = False
    # gated: "replace", the gate replaces alpha / r (UniPELT's); "alpha", G (alpha / r) B A x (unipelt_legacy's)
    gate_scaling: str = "replace"
    # DoRA: W' = m (W + s B A) / ||W + s B A||_c, m trained (one per output unit), started at ||W||_c
    dora: bool = False
    # "lora" (A Kaiming-uniform, B = 0); "pissa" (W's top-r singular triplets) or "olora" (QR of W), both with
    # the initial s B_0 A_0 subtracted again as a frozen correction, so the model starts as the base
    init: str = "lora"

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
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora init must be one of {LORA_INITS}, got {self.init!r}")
        if self.dora and self.gate:
            raise ConfigError("lora dora=True rescales the adapted weight; a UniPELT gate on top of it has no "
                              "reference: drop gate or dora")


class LoRAPair(nn.Module):
    """``A`` (r x in) and ``B`` (out x r); with PiSSA/OLoRA also the frozen initial factors ``A0``, ``B0``
    (buffers), with DoRA the magnitude ``m`` (out)."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.A = nn.Linear(in_features, r, bias=False)
        self.B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    @property
    def residual(self) -> bool:
        """Whether the update carries PiSSA's/OLoRA's frozen correction ``- B0 A0``."""
        return "A0" in self._buffers

    # With the correction, ``B A - B0 A0 = (B - B0) A + B0 (A - A0) = [B - B0, B0] [A; A - A0]``: one rank-2r
    # product whose factors' second halves are exactly zero at init (the update is exactly zero there), and which
    # never subtracts two large principal parts from each other; its gradients are those of ``B A``.
    def down_weight(self) -> torch.Tensor:
        """``A``, or ``[A; A - A0]`` (2r x in) with the frozen correction."""
        a = self.A.weight
        return torch.cat([a, a - self.A0.to(a.dtype)]) if self.residual else a

    def up_weight(self) -> torch.Tensor:
        """``B``, or ``[B - B0, B0]`` (out x 2r) with the frozen correction."""
        b = self.B.weight
        if not self.residual:
            return b
        b0 = self.B0.to(b.dtype)
        return torch.cat([b - b0, b0], dim=1)

    def delta_weight(self) -> torch.Tensor:
        """``B A``, or ``B A - B0 A0`` with the frozen correction (unscaled)."""
        return self.up_weight() @ self.down_weight()


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A, B)`` from ``weight`` ``(out, in)``: ``W = U S V^T``, ``A = sqrt(S_r / s) V_r^T``,
    ``B = U_r sqrt(S_r / s)``, so ``s B A = U_r S_r V_r^T`` (peft ``LoraLayer.pissa_init``, float32)."""
    u, sv, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    root = torch.sqrt(sv[:r] / scaling)
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A, B)`` from ``weight`` ``(out, in)``: ``W = Q R``, ``A = R[:r]``, ``B = Q[:, :r]``
    (peft ``LoraLayer.olora_init``, float32)."""
    q, rr = torch.linalg.qr(weight.detach().to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _no_autocast(t: torch.Tensor):
    """A context where ``t``'s device runs without autocast (DoRA's norm stays in the magnitude's dtype)."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


@register_method(LoRAConfig)
class LoRA(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: acts on its task's rows of a batch only

    def __init__(self, config: LoRAConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.scaling = config.alpha / config.r
        self.sites: dict[str, Projection] = {}
        self.causal: dict[str, bool] = {}
        self.pairs = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for site_key, proj in model_map.projections(config.targets, config.layers, config.exclude):
            self.causal[site_key] = model_map.causal(proj.module)
            if config.r > min(proj.in_features, proj.out_features):
                raise ConfigError(
                    f"lora rank r={config.r} does not fit {proj.path} ({proj.in_features} -> {proj.out_features}); "
                    f"use r <= {min(proj.in_features, proj.out_features)}"
                )
            self.sites[site_key] = proj
            self.pairs[site_key] = pair = LoRAPair(proj.in_features, proj.out_features, config.r)
            if config.init != "lora" or config.dora:  # computed from W: on W's device (attach moves it after)
                pair.to(proj.module.weight.device)
            if config.init != "lora":
                self._init_from_weight(pair, proj)
            if config.dora:  # m = ||W + s B A||_c by the forward's own computation: m / n is exactly 1 at init
                pair.m = nn.Parameter(self.weight_norm(site_key).clone())
            if config.gate:
                self.gates[site_key] = Gate(proj.in_features)

    @torch.no_grad()
    def _init_from_weight(self, pair: LoRAPair, proj: Projection) -> None:
        """PiSSA/OLoRA: ``A, B`` from the base weight, and the same values kept frozen as ``A0, B0``, whose
        ``- s B0 A0`` makes the update zero at init (peft subtracts it from the base weight instead)."""
        w = proj.weight()
        if self.config.init == "pissa":
            a, b = pissa_factors(w, self.config.r, self.scaling)
        else:
            a, b = olora_factors(w, self.config.r)
        pair.A.weight.copy_(a)
        pair.B.weight.copy_(b)
        pair.register_buffer("A0", a.clone())
        pair.register_buffer("B0", b.clone())

    def weight_norm(self, site_key: str) -> torch.Tensor:
        """DoRA's ``||W + s B A||_c`` (``s (B A - B0 A0)`` with PiSSA/OLoRA): the norm of each output unit's row
        over the inputs, as peft's ``DoraLinearLayer.get_weight_norm``; in the magnitude's dtype, without
        autocast, and constant to the gradient (the paper's Section 4.3, peft's ``weight_norm.detach()``)."""
        pair, w = self.pairs[site_key], self.sites[site_key].weight()
        dtype = pair.m.dtype if "m" in pair._parameters else pair.A.weight.dtype
        with torch.no_grad(), _no_autocast(w):
            v = w.to(dtype) + self.scaling * (pair.up_weight().to(dtype) @ pair.down_weight().to(dtype))
            return torch.linalg.norm(v, dim=1)

    def dora_scale(self, site_key: str) -> torch.Tensor:
        """``m / ||W + s B A||_c`` (out,): DoRA's factor on each output unit; a gradient reaches ``m`` only."""
        return self.pairs[site_key].m / self.weight_norm(site_key)

    def scaled_delta(self, site_key: str) -> torch.Tensor:
        """What merge adds to W, and what ``fold=True`` adds to it per call: ``(alpha / r) B A`` (``B A - B0 A0``
        with PiSSA/OLoRA); with DoRA ``W' - W = (m / n - 1) W + (m / n) (alpha / r) B A``."""
        delta = self.pairs[site_key].delta_weight() * self.scaling
        if not self.config.dora:
            return delta
        scale = self.dora_scale(site_key)[:, None]
        return (scale - 1) * self.sites[site_key].weight().to(delta.dtype) + scale * delta

    def _hook(self, site_key: str, proj: Projection, installer: Installer, fused=None):
        """The output hook ``h <- W x + (alpha / r) B A D(x)`` (``D`` dropout); gated, ``W x + G_L B A x`` (or
        ``G_L (alpha / r) B A x`` with ``gate_scaling="alpha"``). ``fused``: the site's share of its group's one
        stacked GEMM (the speed path below), else ``A x`` is its own GEMM. With PiSSA/OLoRA ``A`` and ``B`` are
        ``[A; A - A0]`` and ``[B - B0, B0]`` (:class:`LoRAPair`; with dropout the frozen ``A0`` reads ``x``, not
        ``D(x)``, as peft's ``W_res x``); with DoRA the output is rescaled (:meth:`_dora_output`)."""
        pair = self.pairs[site_key]
        gate = self.gates[site_key] if site_key in self.gates else None  # noqa: SIM401 (ModuleDict has no get)
        residual, dora = pair.residual, self.config.dora
        scaling, p = self.scaling, self.config.dropout
        pooling, causal, own_rows = self.config.gate_pooling, self.causal[site_key], installer.own_rows
        gated_scaling = scaling if self.config.gate_scaling == "alpha" else 1.0

        # Per call: one GEMM for A x (shared with the group's other sites, see _fused_reader), one for
        # output + s B (A x) (the add rides in the GEMM); weights are used directly, without module calls,
        # since at small batches Python per op is the cost.
        def add_lora(module, inputs, output):
            # the weights are read per call, not once at install: FSDP swaps a module's parameters for
            # gathered ones in every forward, and a weight kept from install would get no gradient there
            a, b = pair.A.weight, pair.B.weight
            x = inputs[0]
            gate_logit = None
            dropping = bool(p) and self.training
            xd = torch.nn.functional.dropout(x, p, True) if dropping else x
            if fused is not None:
                h, gate_logit = fused(site_key, x)
            elif residual and dropping:  # s B A D(x) - s B0 A0 x: peft's W_res x + s B A D(x)
                ax = torch.nn.functional.linear(matmul_input(xd, a), a)
                a0 = pair.A0.to(a.dtype)
                h = torch.cat([ax, ax - torch.nn.functional.linear(matmul_input(x, a0), a0)], dim=-1)
            else:
                down = pair.down_weight() if residual else a
                h = torch.nn.functional.linear(matmul_input(xd, down), down)
            h = own_rows(h)  # multi-task serving: A x zero on other tasks' rows, so is their delta
            up = pair.up_weight() if residual else b
            if dora:
                delta = torch.nn.functional.linear(h, up) * scaling
                return self._dora_output(site_key, output, x, xd if dropping else None, delta, installer)
            if gate is not None:
                logit = gate_logit if gate_logit is not None else gate.logits(x)
                g = gate_values(logit, pooling, installer.context.padding_mask, causal)
                # one scalar per example (or token): scaling the rank-r rows of A x is the same as scaling the
                # d-wide delta, at a fraction of the traffic; the gate replaces alpha / r, the add rides in the GEMM
                return add_up_projection(output, h * g, up, gated_scaling, proj)
            return add_up_projection(output, h, up, scaling, proj)

        return add_lora

    def _dora_output(self, site_key: str, output: torch.Tensor, x: torch.Tensor, xd: torch.Tensor | None,
                     delta: torch.Tensor, installer: Installer) -> torch.Tensor:
        """DoRA on the module's output ``y = W x + b``: ``y + (k - 1) W_res x + k delta`` with
        ``k = m / ||W + s (B A - B0 A0)||_c``, ``delta = s (B A - B0 A0) x`` and ``W_res = W - s B0 A0`` (the B0 A0
        terms only with PiSSA/OLoRA), that is ``k (W + s (B A - B0 A0)) x + b``: peft's
        ``(k - 1) base + k s B A x`` on its residual base. In training with dropout (``xd = D(x)``) peft's middle
        term reads ``W_res D(x)`` and ``delta = s (B A D(x) - B0 A0 x)``: the middle term is then
        ``W D(x) + s B0 A0 (x - D(x))``, which makes the sum peft's. ``delta`` is already on this method's rows."""
        pair, proj = self.pairs[site_key], self.sites[site_key]
        k = self.dora_scale(site_key)
        part = output if proj.out_slice is None else output[..., proj.out_slice]
        if xd is None:
            bias = proj.bias()
            lin = part - bias if bias is not None else part
        else:
            w = proj.weight()
            lin = torch.nn.functional.linear(matmul_input(xd, w), w)
            if pair.residual:
                a0, b0 = pair.A0.to(delta.dtype), pair.B0.to(delta.dtype)
                lin = lin + self.scaling * torch.nn.functional.linear(
                    torch.nn.functional.linear(matmul_input(x - xd, a0), a0), b0)
        change = installer.own_rows(cast_like((k - 1) * lin + k * delta, output))
        return output + proj.place(change)

    def install(self, installer: Installer) -> None:
        # DoRA rescales the module's output, which holds whatever an earlier hook added: "other", so that merge
        # folds it only where no other delta hooks the same module
        kind = "other" if self.config.dora else "output"
        if self.config.fold:  # speed path: the same update inside the projection's own GEMM, x (W + s B A)^T
            for site_key, proj in self.sites.items():
                installer.add_weight_delta(proj, lambda site_key=site_key: self.scaled_delta(site_key),
                                           self._hook(site_key, proj, installer), kind)
            return
        # Sites of one attention (q, v, ...) usually read the same input tensor: their A's and gates then
        # run as one GEMM over it (one read of x, one gradient back into x instead of one per site).
        for group in attention_input_groups(self.sites):
            fused = self._fused_reader(group, installer.context.values) \
                if len(group) > 1 and not self.config.dropout else None
            for site_key in group:
                installer.on_output(self.sites[site_key].module,
                                    self._hook(site_key, self.sites[site_key], installer, fused), kind)

    def mergeable(self) -> bool:
        return not self.config.gate

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(self.scaled_delta(site_key))

    # --- speed path: the sites of one attention that read the same input (q, v, ...) run their A's and gate rows
    # as one GEMM over it (:func:`~unipelt.runtime.stacked_linear`), each site taking its columns: the same
    # ``A x`` and gate logits as ``_hook``'s own GEMMs.
    def _fused_reader(self, group: list[str], cache: dict):
        """``read(site_key, x) -> (A x, gate pre-activation or None)`` computed once per input for the group.

        The first site of the group to see an input computes ``x [A_1; ...; A_n; w_g1; ...; w_gn]^T``
        (``shared_by_input``); the others take their columns.
        """
        n = len(group)
        gated = all(k in self.gates for k in group)
        column = {k: i for i, k in enumerate(group)}

        def compute(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            weights = [self.pairs[k].down_weight() for k in group]  # [A; A0] with PiSSA/OLoRA's correction
            widths = [w.shape[0] for w in weights]
            biases = None
            if gated:
                weights += [self.gates[k].proj.weight for k in group]
                biases = [x.new_zeros(sum(widths), dtype=weights[0].dtype),
                          *[self.gates[k].proj.bias for k in group]]
            return stacked_linear(x, weights, biases, widths + [1] * (n if gated else 0))

        shared = shared_by_input(cache, (id(self), group[0]), n, compute)

        def read(site_key: str, x: torch.Tensor):
            parts, i = shared(x), column[site_key]
            return parts[i], (parts[n + i] if gated else None)

        return read

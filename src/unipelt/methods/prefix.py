"""Prefix tuning (Li and Liang 2021): ``l`` trainable key and value vectors per attention.

``softmax(q [P_k; K]^T / sqrt(d_h)) [P_v; V]``: each attention's keys and values with its prefix ``P_k``,
``P_v`` (l x d_kv each) in front, visible to every query.

The prefixes are prepended to the keys and values of every attention (self and cross) through
:mod:`unipelt.attention`, so they work with eager and SDPA attention, padding masks and the
key/value cache. During training they are reparametrised, ``P = MLP(E)`` with ``E`` of shape
``l x d`` and an MLP ``d -> hidden (512) -> sum of 2 d_kv`` over all attentions, computed once per
forward pass. ``save`` writes the computed prefixes and drops the MLP; a loaded prefix is direct.
Without reparametrisation (``reparam=False``, P-tuning v2's deep prompts) the prefixes are one
trainable table of that layout, ``l x sum of 2 d_kv``.

Reference: XiangLi1999/PrefixTuning ``gpt2/train_control.py`` (``wte``, ``control_trans``: Linear, Tanh,
Linear, hidden 512; no dropout); jxhe/unify-parameter-efficient-tuning ``petl/petl_factory.py`` (MAM's prefix,
hidden 800). Init (``init``):

- ``"default"``: PyTorch's own, as those repositories and adapters' ``PrefixTuning`` leave it: ``E ~ N(0, 1)``
  and ``nn.Linear``'s default; a direct table ``~ N(0, 1)`` (PrefixTuning's shallow ``torch.randn``, adapters'
  ``FlatPrefixTuning``, peft's ``prefix_projection=False``).
- ``"bert"``: ``E``, both Linears' weights (and a direct table) ``~ N(0, 0.02)``, biases zero: UniPELT's, whose
  ``BertModel.init_weights`` re-initialises the prefix modules (morningmoni/UniPELT
  ``transformers/models/bert/modeling_bert.py`` L580-586, L795-809).
- ``"words"``: ours, in no reference: a fixed offset ``P0`` of random vocabulary words' keys and values
  (embeddings standardised and put through each attention's W_k, W_v), ``P = MLP(E) + P0`` with the MLP's
  output layer scaled by 0.01 (a direct table starts at ``P0``).

UniPELT gate: ``G_P`` the mean over the example's tokens of ``sigmoid(w_g . x_t + b_g)``, ``x`` the attention's
input, scales ``P_k`` and ``P_v`` (UniPELT ``modeling_bert.py`` L320-322; adapters ``prefix_tuning.py``
``compose_single``). In a decoder, where that mean would read later tokens, the gate is per query token and
scales what the prefix adds to that token's attention output (``P_v`` seen by that query). Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Gate, Installer, gate_per_token, gate_values
from ..sites import AttentionSites, ModelMap
from .base import DeltaMethod

PREFIX_INITS = ("default", "bert", "words")


@dataclass
class PrefixConfig(MethodConfig):
    method = "prefix"
    description = "prefix tuning: l trainable key/value vectors per attention (MLP-reparametrised in training)"
    gateable = True

    length: int = 10
    reparam: bool = True
    reparam_hidden: int = 512
    init: str = "default"  # "default" (PyTorch's, as Li and Liang) | "bert" (UniPELT's N(0, 0.02)) | "words" (ours)

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("length", "reparam_hidden")
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"prefix init must be one of {PREFIX_INITS}, got {self.init!r}")


@register_method(PrefixConfig)
class Prefix(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True  # multi-task serving: other tasks' rows do not see this prefix

    def __init__(self, config: PrefixConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        if not model_map.family.supports_prefix:
            raise ConfigError(f"prefix-style methods do not support family '{model_map.family.name}': "
                              f"{model_map.family.prefix_reason}")
        self.sites: dict[str, AttentionSites] = {}
        self.causal: dict[str, bool] = {}
        for layer in model_map.layers:
            for att in layer.attentions:
                site_key = f"{layer.key}_{att.kind}"
                self.sites[site_key] = att
                self.causal[site_key] = layer.causal
        self.kv_dims = {k: att.k.out_features for k, att in self.sites.items()}
        d, l = model_map.hidden_size, config.length
        self.gates = nn.ModuleDict()
        if config.gate:
            for site_key, att in self.sites.items():
                self.gates[site_key] = Gate(att.q.in_features)
        width = sum(2 * v for v in self.kv_dims.values())
        words = self._table(self._word_like_prefixes(model_map, l)) if config.init == "words" else None
        if config.reparam:
            self.embedding = nn.Parameter(torch.randn(l, d))
            self.mlp = nn.Sequential(nn.Linear(d, config.reparam_hidden), nn.Tanh(),
                                     nn.Linear(config.reparam_hidden, width))
            with torch.no_grad():
                if config.init == "bert":
                    for p in (self.embedding, self.mlp[0].weight, self.mlp[2].weight):
                        nn.init.normal_(p, std=0.02)
                    nn.init.zeros_(self.mlp[0].bias)
                    nn.init.zeros_(self.mlp[2].bias)
                elif config.init == "words":  # P = MLP(E) + P0: training starts near the word-like prefixes P0
                    self.mlp[2].weight.mul_(0.01)
                    self.mlp[2].bias.mul_(0.01)
            self.register_buffer("start", words, persistent=words is not None)
            self.table = None
        else:
            # Every attention's prefix in one tensor, laid out as the MLP's output: one trainable tensor, not
            # one per attention, so one gradient accumulation and one optimizer state per step. The split
            # per pass is views, and its backward one concatenation.
            self.table = nn.Parameter(words if words is not None else
                                      torch.randn(l, width) * (0.02 if config.init == "bert" else 1.0))

    def _word_like_prefixes(self, model_map: ModelMap, l: int) -> dict[str, torch.Tensor]:
        """Keys and values of ``l`` random vocabulary words at each attention, shaped (2, l, d_kv) (``init="words"``).

        Li and Liang found prefixes initialised from real words' activations train better than random ones in
        low-data settings (there, as trained contextual keys and values; here a fixed offset, with no context).
        The words' embeddings are standardised like a normalised hidden state and put through each attention's
        own key and value projections.
        """
        weight = getattr(model_map.input_embeddings(), "weight", None)
        d = model_map.hidden_size
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == d:
            x = weight.detach()[torch.randint(0, weight.shape[0], (l,))].float()
        else:
            x = torch.randn(l, d)
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
        out = {}
        with torch.no_grad():
            for site_key, att in self.sites.items():
                rows = []
                for proj in (att.k, att.v):
                    w, b = proj.weight().float(), proj.bias()
                    xin = x if x.shape[1] == w.shape[1] else torch.randn(l, w.shape[1])
                    y = xin.to(w.device) @ w.t() + (b.float() if b is not None else 0.0)
                    rows.append(y.cpu())
                out[site_key] = torch.stack(rows)
        return out

    def _table(self, prefixes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-attention (2, l, d_kv) prefixes as one (l, sum of 2 d_kv) table: [k | v] per attention, in order
        (the MLP's output layout, and peft's and adapters' flat prefix's)."""
        return torch.cat([prefixes[k].transpose(0, 1).reshape(self.config.length, -1) for k in self.kv_dims], 1)

    def _all_prefixes(self) -> dict[str, torch.Tensor]:
        """Every attention's (2, l, d_kv) prefix; the MLP runs once per forward pass."""
        if self.table is not None:
            flat = self.table
        else:
            flat = self.mlp(self.embedding)  # (l, sum 2 d_kv); bf16 under autocast, and it stays so
            if self.start is not None:
                flat = flat + self.start.to(flat.dtype)
        # split, not slices: its backward is one concatenation instead of a zero-filled copy per attention
        pieces = flat.split([2 * dkv for dkv in self.kv_dims.values()], dim=1)
        return {site_key: piece.reshape(-1, 2, dkv).transpose(0, 1)
                for (site_key, dkv), piece in zip(self.kv_dims.items(), pieces, strict=True)}

    def _prefix_of(self, site_key: str) -> torch.Tensor:
        """One attention's (2, l, d_kv) prefix, computed on its own (its rows of the MLP's output layer): under
        gradient checkpointing each layer's recompute computes its own, as the pass did."""
        offset = 0
        for key, dkv in self.kv_dims.items():
            if key == site_key:
                break
            offset += 2 * dkv
        rows = slice(offset, offset + 2 * self.kv_dims[site_key])
        if self.table is not None:
            flat = self.table[:, rows]
        else:
            hidden = self.mlp[1](self.mlp[0](self.embedding))
            flat = torch.nn.functional.linear(hidden, self.mlp[2].weight[rows], self.mlp[2].bias[rows])
            if self.start is not None:
                flat = flat + self.start[:, rows].to(flat.dtype)
        return flat.reshape(-1, 2, self.kv_dims[site_key]).transpose(0, 1)

    def install(self, installer: Installer) -> None:
        values = installer.context.values
        cache_slot = (id(self), "prefixes")
        context = installer.context

        def prefix(site_key: str) -> torch.Tensor:
            if context.per_layer:
                return self._prefix_of(site_key)
            return context.once(cache_slot, self._all_prefixes, uses=len(self.sites))[site_key]

        for site_key, att in self.sites.items():
            gate_slot = (id(self), site_key, "x")
            if site_key in self.gates:
                def stash(module, inputs, slot=gate_slot):
                    values[slot] = inputs[0]

                installer.on_input(att.q.module, stash)

            def provide(module, query, key, value, site_key=site_key, gate_slot=gate_slot):
                p = prefix(site_key)  # (2, l, d_kv)
                b, h_kv, _, hd = key.shape
                if p.dtype != key.dtype:
                    p = p.to(key.dtype)  # once per layer, before the batch expansion (not b copies)
                kv = p.reshape(2, p.shape[1], h_kv, hd).permute(0, 2, 1, 3)  # (2, heads, l, head_dim), a view
                pk, pv = (t.unsqueeze(0).expand(b, -1, -1, -1) for t in kv.unbind(0))
                rows = installer.row_mask()  # multi-task serving: the rows that see this prefix
                if site_key not in self.gates:
                    return pk, pv, None, rows
                x = values.pop(gate_slot)
                causal, pooling = self.causal[site_key], self.config.gate_pooling
                g = gate_values(self.gates[site_key].logits(x), pooling, context.padding_mask, causal)
                if gate_per_token(pooling, causal):
                    return pk, pv, g, rows  # (b, q, 1): per query token
                g = g.view(-1, 1, 1, 1)  # (b, 1, 1, 1): one gate per example scales P_k and P_v
                return pk * g.to(pk.dtype), pv * g.to(pv.dtype), None, rows

            installer.kv_provider(att.module, provide)

    def saved_config(self) -> PrefixConfig:
        return replace(self.config, reparam=False)

    def delta_state(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            state = {f"prefixes.{k}": v.detach().clone() for k, v in self._all_prefixes().items()}
        state.update({f"gates.{k}": v.detach() for k, v in self.gates.state_dict().items()})
        return state

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        """The saved form (``prefixes.<attention>``, (2, l, d_kv) each, and the gates) into the table."""
        if self.table is None:  # a saved prefix loads as a direct one (saved_config), never into an MLP
            raise ConfigError("a saved prefix loads into a prefix without reparametrisation (reparam=False)")
        saved = {k.removeprefix("prefixes."): v for k, v in state.items() if k.startswith("prefixes.")}
        if set(saved) != set(self.kv_dims):
            raise ConfigError(f"saved delta does not fit method '{self.config.method}': its prefixes are for "
                              f"{sorted(saved)[:5]}, this model's attentions are {list(self.kv_dims)[:5]}")
        for k, dkv in self.kv_dims.items():
            if tuple(saved[k].shape) != (2, self.config.length, dkv):
                raise ConfigError(f"saved prefix for {k} has shape {tuple(saved[k].shape)}, this model needs "
                                  f"{(2, self.config.length, dkv)} (length {self.config.length}, key width {dkv})")
        rest = {k: v for k, v in state.items() if not k.startswith("prefixes.")}
        super().load_delta_state({**rest, "table": self._table(saved)})

"""AdapterBias (Fu et al. 2022): a token-dependent shift of the FFN output.

``h <- W_2 u + b_2 + alpha(u) v``, with ``u`` the FFN's intermediate activation (W_2's input, d_ff wide),
``alpha(u) = w . u + c`` a linear layer d_ff -> 1 giving each token its weight, ``v`` in R^d a shift vector.
Reference: Allen0307/AdapterBias@fd9929f. ``src/transformers/models/bert/modeling_bert.py``, ``BertOutput``:
``adapter_alpha = nn.Linear(intermediate_size, 1)`` and ``adapter_vector`` zeros (427-429); ``y =
adapter_alpha(u)`` before ``dense``, the shift added after ``dropout`` (436-440); RoBERTa's ``RobertaOutput``
the same (357-378). ``src/model.py:13-24``: every parameter named ``LayerNorm`` outside ``attention`` trains.
``src/config.py:17`` and ``src/exp.py:65-66``: AdamW at lr 1e-4 for every part (``reference_lr``).

``v`` starts at zero, so the model starts as the base model. The shift is added after the FFN's output
dropout (where the family has a dropout module; else on W_2's output), before the residual add and LayerNorm.
With ``train_layer_norms`` (the default, as the reference) the LayerNorms outside the attention sub-layers
train too, as tuned gains and biases starting at their base values (``ln`` tuning's code): each layer's FFN
LayerNorm and the body's norms outside the layers (BERT, RoBERTa: the embeddings' LayerNorm, exactly the
reference's set; pre-LN models: the final norm). Not here: the reference's ``share_alpha`` option (one alpha
for all layers, off by default) and its weight decay on alpha's weight (AdamW's 0.01; the trainer's is 0).

Parameters: ``d + d_ff + 1`` per layer, plus the trained norms' gains and biases; at BERT-base
``L (d + d_ff + 1) + 2 d (L + 1) = 12 * 3 841 + 19 968 = 66 060`` (``L`` FFN LayerNorms and the
embeddings'). Mergeable where W_2 has a bias, since ``alpha`` is linear: ``W_2 <- W_2 + v w^T``,
``b_2 <- b_2 + c v`` (exact in eval mode, where dropout is the identity), and the norms take their tuned
values; a W_2 without a bias (LLaMA, T5) cannot hold ``c v``, so there the method stays a delta. ``save``
stores the tuned gains and biases themselves (``layer_norms.gains.*``, ``layer_norms.biases.*``): base plus
a saved difference would not round to them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input
from .ln_tuning import LNConfig, LNTuning, _is_norm


@dataclass
class AdapterBiasConfig(MethodConfig):
    method = "adapter_bias"
    description = ("AdapterBias: a shift vector v weighted per token by a linear alpha of the FFN intermediate, "
                   "after the FFN; trains the FFN and embedding LayerNorms")
    reference_lr: ClassVar[float | None] = 1e-4  # AdapterBias src/config.py:17 (--lr 0.0001, every GLUE task)

    train_layer_norms: bool = True  # the reference's src/model.py:13-24; False: only v and alpha train


def trained_norms(model_map: ModelMap) -> list[nn.Module]:
    """The LayerNorms the reference trains: each layer's FFN norm, and the body's norms outside the layers
    (BERT, RoBERTa: the embeddings' LayerNorm; pre-LN models: the final norm). The attention sub-layers'
    norms stay frozen."""
    norms = [layer.ffn_norm for layer in model_map.layers if layer.ffn_norm is not None]
    inside = {id(m) for layer in model_map.layers for m in layer.module.modules()}
    ids = {id(m) for m in norms}
    for _, module in model_map.base_modules():
        if id(module) not in inside and id(module) not in ids and _is_norm(module):
            norms.append(module)
            ids.add(id(module))
    return norms


def norm_tuning(model_map: ModelMap, norms: list[nn.Module]) -> LNTuning | None:
    """LN tuning restricted to ``norms`` (their gains and biases train, starting at the base values)."""
    if not norms:
        return None
    tuning = LNTuning(LNConfig(), model_map)
    keep = {id(m) for m in norms}
    for k in [k for k, m in tuning.norms.items() if id(m) not in keep]:
        del tuning.norms[k]
        del tuning.gains[k]
        if k in tuning.biases:
            del tuning.biases[k]
    return tuning


@register_method(AdapterBiasConfig)
class AdapterBias(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True

    def __init__(self, config: AdapterBiasConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.layers = {f"{layer.key}_ffn": layer for layer in model_map.layers}
        self.sites: dict[str, Projection] = {k: layer.ffn_out for k, layer in self.layers.items()}
        self.shifts = nn.ParameterDict({k: nn.Parameter(torch.zeros(p.out_features)) for k, p in self.sites.items()})
        # alpha reads W_2's input u (d_ff wide), as the reference's Linear(intermediate_size, 1)
        self.alphas = nn.ModuleDict({k: nn.Linear(p.in_features, 1) for k, p in self.sites.items()})
        self.layer_norms = norm_tuning(model_map, trained_norms(model_map)) if config.train_layer_norms else None

    def install(self, installer: Installer) -> None:
        stash = installer.context.values
        for k, proj in self.sites.items():
            dropout = self.layers[k].ffn_output  # the FFN's output dropout, where the reference adds the shift
            if dropout is None:  # no dropout module (LLaMA, BART's functional dropout): on W_2's output
                installer.on_output(proj.module, self._add_on_output(k, proj, installer.own_rows))
            else:
                slot = (id(self), k)
                installer.on_output(proj.module, self._read_weight(k, slot, stash))
                installer.on_output(dropout, self._add_after_dropout(k, proj, slot, stash, installer.own_rows))
        if self.layer_norms is not None:
            self.layer_norms.install(installer)

    def _token_weight(self, k: str, u: torch.Tensor) -> torch.Tensor:
        """``alpha(u) = w . u + c`` per token, (..., 1)."""
        alpha = self.alphas[k]
        return F.linear(matmul_input(u, alpha.weight), alpha.weight, alpha.bias)

    def _add_on_output(self, k: str, proj: Projection, own_rows):
        def add_shift(module, inputs, output):
            shift = self.shifts[k]  # read per call (FSDP swaps parameters each forward)
            weight = self._token_weight(k, inputs[0])
            return output + proj.place(cast_like(own_rows(weight * shift), output))

        return add_shift

    def _read_weight(self, k: str, slot: tuple, stash: dict):
        def read(module, inputs, output):
            stash[slot] = self._token_weight(k, inputs[0])  # W_2's output itself stays as it is

        return read

    def _add_after_dropout(self, k: str, proj: Projection, slot: tuple, stash: dict, own_rows):
        def add_shift(module, inputs, output):
            shift = self.shifts[k]
            weight = stash.pop(slot, None)
            if weight is None:
                raise RuntimeError(f"adapter_bias {k}: the FFN's W_2 was not seen before its dropout")
            return output + proj.place(cast_like(own_rows(weight * shift), output))

        return add_shift

    def mergeable(self) -> bool:
        return all(p.bias() is not None for p in self.sites.values())

    @torch.no_grad()
    def merge(self) -> None:
        for k, proj in self.sites.items():
            v, w, c = self.shifts[k].float(), self.alphas[k].weight[0].float(), self.alphas[k].bias[0].float()
            bias = proj.bias()
            proj.add_to_weight(torch.outer(v, w))  # W_2 u + alpha(u) v = (W_2 + v w^T) u + c v
            bias.add_((c * v).to(bias.dtype))
        if self.layer_norms is not None:
            self.layer_norms.merge()

"""The one place that knows where each model family keeps its layers.

A family is a row: the model types it covers, and for each stack of layers (encoder, decoder)
the module paths, relative to one layer, of the attention projections, the FFN and its
activation. Paths are relative to ``model.base_model``. Adding a family is adding a row.

A path listed as a tuple names alternatives or several modules (LLaMA's FFN reads its input
through both ``gate_proj`` and ``up_proj``; T5 v1.1 uses ``wi_0``/``wi_1`` instead of ``wi``);
those that do not exist in a given model are skipped.

Serial adapters also need where a sub-layer's output ends: the module whose output is that output after
its dropout, just before the residual add (``out`` of an attention, ``ffn_output`` of the FFN; ``None``
where the dropout is a function call, or a module shared by both sub-layers: then the last projection's
output, the same tensor whenever dropout is off), and the LayerNorm around the FFN's residual add
(``ffn_norm``): after it in post-LN models (BERT: ``LN(h + x)``), before the FFN in pre-LN ones
(``norm_first``: ``x + FFN(LN(x))``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class AttentionSpec:
    """Where one attention block keeps its parts, relative to its layer.

    ``qkv`` names a fused projection (GPT-2's ``c_attn``) whose output is q, k and v side by side;
    then ``q``, ``k`` and ``v`` are ``None`` and methods act on slices of the fused output.
    """

    kind: str  # "self" or "cross"
    module: str  # the module that calls the attention function
    q: str | None
    k: str | None
    v: str | None
    o: str
    qkv: str | None = None
    out: str | None = None  # the sub-layer's output after its dropout (None: the output of ``o``)


@dataclass(frozen=True)
class StackSpec:
    name: str  # "layers" for single-stack models, "encoder"/"decoder" otherwise
    layers: str  # path of the ModuleList of layers
    attentions: tuple[AttentionSpec, ...]
    ffn_in: tuple[str, ...]
    ffn_out: str
    activation: str  # module holding the FFN non-linearity (attribute path)
    ffn_norm: str | None = None  # the LayerNorm of the FFN's residual: after the add, or before the FFN
    norm_first: bool = False  # pre-LN: ``x + FFN(ffn_norm(x))``; post-LN: ``ffn_norm(x + FFN(x))``
    ffn_output: str | None = None  # the FFN's output after its dropout (None: the output of ``ffn_out``)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    stacks: tuple[StackSpec, ...]
    prompt_after_cls: bool  # prompt tokens go after [CLS] (encoders with a leading summary token)
    supports_prefix: bool = True
    prefix_reason: str = ""


def _bert_like(name: str, model_types: tuple[str, ...], q="query", k="key", v="value",
               supports_prefix: bool = True, prefix_reason: str = "") -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=model_types,
        stacks=(
            StackSpec(
                name="layers",
                layers="encoder.layer",
                attentions=(
                    AttentionSpec("self", "attention.self", f"attention.self.{q}", f"attention.self.{k}",
                                  f"attention.self.{v}", "attention.output.dense", out="attention.output.dropout"),
                ),
                ffn_in=("intermediate.dense",),
                ffn_out="output.dense",
                activation="intermediate.intermediate_act_fn",
                ffn_norm="output.LayerNorm",
                ffn_output="output.dropout",
            ),
        ),
        prompt_after_cls=True,
        supports_prefix=supports_prefix,
        prefix_reason=prefix_reason,
    )


def _t5_stack(name: str) -> StackSpec:
    attentions = [AttentionSpec("self", "layer.0.SelfAttention", "layer.0.SelfAttention.q",
                                "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
                                out="layer.0.dropout")]
    ffn = "layer.1"
    if name == "decoder":
        attentions.append(AttentionSpec("cross", "layer.1.EncDecAttention", "layer.1.EncDecAttention.q",
                                        "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
                                        "layer.1.EncDecAttention.o", out="layer.1.dropout"))
        ffn = "layer.2"
    return StackSpec(
        name=name,
        layers=f"{name}.block",
        attentions=tuple(attentions),
        ffn_in=(f"{ffn}.DenseReluDense.wi", f"{ffn}.DenseReluDense.wi_0", f"{ffn}.DenseReluDense.wi_1"),
        ffn_out=f"{ffn}.DenseReluDense.wo",
        activation=f"{ffn}.DenseReluDense.act",
        ffn_norm=f"{ffn}.layer_norm",
        norm_first=True,
        ffn_output=f"{ffn}.dropout",
    )


def _bart_stack(name: str) -> StackSpec:
    attentions = [AttentionSpec("self", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.out_proj")]
    if name == "decoder":
        attentions.append(AttentionSpec("cross", "encoder_attn", "encoder_attn.q_proj", "encoder_attn.k_proj",
                                        "encoder_attn.v_proj", "encoder_attn.out_proj"))
    # BART's dropouts are function calls: serial adapters read fc2's and out_proj's outputs
    return StackSpec(name=name, layers=f"{name}.layers", attentions=tuple(attentions), ffn_in=("fc1",),
                     ffn_out="fc2", activation="activation_fn", ffn_norm="final_layer_norm")


FAMILIES: tuple[FamilySpec, ...] = (
    _bert_like("bert", ("bert",)),
    _bert_like("roberta", ("roberta", "xlm-roberta")),
    _bert_like("electra", ("electra",)),
    _bert_like("deberta-v2", ("deberta-v2",), q="query_proj", k="key_proj", v="value_proj",
               supports_prefix=False,
               prefix_reason="DeBERTa-v2's disentangled attention adds content-to-position scores per key "
                             "position inside its own attention code; prefix keys have no position there"),
    FamilySpec(
        name="distilbert",
        model_types=("distilbert",),
        stacks=(StackSpec("layers", "transformer.layer",
                          (AttentionSpec("self", "attention", "attention.q_lin", "attention.k_lin",
                                         "attention.v_lin", "attention.out_lin"),),
                          ("ffn.lin1",), "ffn.lin2", "ffn.activation", ffn_norm="output_layer_norm",
                          ffn_output="ffn.dropout"),),
        prompt_after_cls=True,
    ),
    FamilySpec(
        name="gpt2",
        model_types=("gpt2",),
        stacks=(StackSpec("layers", "h",
                          (AttentionSpec("self", "attn", None, None, None, "attn.c_proj", qkv="attn.c_attn",
                                         out="attn.resid_dropout"),),
                          ("mlp.c_fc",), "mlp.c_proj", "mlp.act", ffn_norm="ln_2", norm_first=True,
                          ffn_output="mlp.dropout"),),
        prompt_after_cls=False,
    ),
    FamilySpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        stacks=(StackSpec("layers", "layers",
                          (AttentionSpec("self", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
                                         "self_attn.v_proj", "self_attn.o_proj"),),
                          ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn",
                          ffn_norm="post_attention_layernorm", norm_first=True),),
        prompt_after_cls=False,
    ),
    FamilySpec(name="t5", model_types=("t5", "mt5"), stacks=(_t5_stack("encoder"), _t5_stack("decoder")),
               prompt_after_cls=False),
    FamilySpec(name="bart", model_types=("bart", "mbart"), stacks=(_bart_stack("encoder"), _bart_stack("decoder")),
               prompt_after_cls=False),
    FamilySpec(
        name="vit",
        model_types=("vit",),
        stacks=(StackSpec("layers", "layers",
                          (AttentionSpec("self", "attention", "attention.q_proj", "attention.k_proj",
                                         "attention.v_proj", "attention.o_proj"),),
                          # one dropout module serves both sub-layers: serial adapters read fc2's and o_proj's outputs
                          ("mlp.fc1",), "mlp.fc2", "mlp.activation_fn", ffn_norm="layernorm_after",
                          norm_first=True),),
        prompt_after_cls=True,
    ),
)

# Top-level modules of a task model that are trained with the delta: randomly initialised heads.
HEAD_MODULES = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head", "pooler")


class UnsupportedModelError(ValueError):
    """The model's family is not in the table, or its layers are not where the table says."""


def family_of(model: nn.Module) -> FamilySpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"unipelt does not know the layers of {type(model).__name__} (model_type={model_type!r}). "
        f"Known model types: {known}. To add it, add a FamilySpec row to unipelt/families.py naming its "
        f"layer list and the paths of q, k, v, o, the FFN input/output projections and the FFN activation."
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or ``None`` where the path does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


# the names model configs give their hidden (residual) dropout, first match wins
_HIDDEN_DROPOUT = ("hidden_dropout_prob", "dropout_rate", "resid_pdrop", "dropout")


def hidden_dropout(config: object) -> float:
    """The model's dropout on its hidden states (BERT's ``hidden_dropout_prob``, T5's ``dropout_rate``, GPT-2's
    ``resid_pdrop``, BART's and DistilBERT's ``dropout``); 0 for models without one (LLaMA)."""
    for name in _HIDDEN_DROPOUT:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0

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

Models the table does not know are described the same way, without editing this file: build a row
(``unipelt.Family``, ``unipelt.Stack``, ``unipelt.Attention``: these dataclasses) and pass it to
``attach(model, config, family=row)`` or :func:`register_family` it. ``unipelt.save`` writes the row of a family
that is not in the table into ``unipelt.json`` (:func:`family_to_dict`), and ``unipelt.load`` resolves the model
with that row again (:func:`family_from_dict`), in a process where it was never registered.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .config import ConfigError


def _as_tuple(value: Any) -> Any:
    """A list, or a lone string or row, as a tuple (rows are written by hand: ``ffn_in="mlp.fc1"`` is fine)."""
    if isinstance(value, (str, AttentionSpec, StackSpec)):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "attentions", _as_tuple(self.attentions))
        object.__setattr__(self, "ffn_in", _as_tuple(self.ffn_in))


@dataclass(frozen=True)
class FamilySpec:
    """One family's row. ``model_types`` are matched against ``model.config.model_type``, or the model's class
    name (for an ``nn.Module`` without a ``transformers`` config). ``heads``: the top-level modules trained and
    saved with the delta (``None``: :data:`HEAD_MODULES`). ``supports_prefix``: whether the attention modules
    call ``transformers``' attention interface, through which prefix-style methods add their keys."""

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[StackSpec, ...]
    prompt_after_cls: bool = False  # prompt tokens go after [CLS] (encoders with a leading summary token)
    supports_prefix: bool = True
    prefix_reason: str = ""
    heads: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_types", _as_tuple(self.model_types))
        object.__setattr__(self, "stacks", _as_tuple(self.stacks))
        if self.heads is not None:
            object.__setattr__(self, "heads", _as_tuple(self.heads))


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


# rows added at run time (register_family), by name: looked up before the table
_REGISTERED: dict[str, FamilySpec] = {}


def _model_keys(model: nn.Module) -> tuple[str | None, str]:
    """What a row's ``model_types`` are matched against: the config's ``model_type`` and the class name."""
    return getattr(getattr(model, "config", None), "model_type", None), type(model).__name__


def family_of(model: nn.Module, family: FamilySpec | None = None) -> FamilySpec:
    """The row describing ``model``: ``family`` when given, else a registered row, else the table's."""
    if family is not None:
        return check_family(family)
    keys = _model_keys(model)
    for row in (*_REGISTERED.values(), *FAMILIES):
        if any(k in row.model_types for k in keys if k):
            return row
    known = ", ".join(t for f in (*_REGISTERED.values(), *FAMILIES) for t in f.model_types)
    raise UnsupportedModelError(
        f"unipelt does not know the layers of {type(model).__name__} (model_type={keys[0]!r}; known: {known}); "
        f"describe them once with unipelt.Family(...) and pass family= to attach, or unipelt.register_family(row) "
        f"(docs/api.md, 'New architectures'), or add the row to unipelt/families.py"
    )


def is_builtin(family: FamilySpec) -> bool:
    """Whether ``family`` is one of the table's rows (a saved delta then names it; others carry their row)."""
    return any(family == row for row in FAMILIES)


def register_family(family: FamilySpec, replace: bool = False) -> FamilySpec:
    """Make ``family`` the row of every model whose ``model_type`` (or class name) it lists, in this process.

    A name or model type that a row already has is an error unless ``replace=True`` (a registered row is looked up
    before the table, so it may then stand in for a table row). Returns the row.
    """
    check_family(family)
    if not replace:
        for row in (*_REGISTERED.values(), *FAMILIES):
            clash = set(row.model_types) & set(family.model_types)
            if row.name == family.name or clash:
                what = f"name {row.name!r}" if row.name == family.name else f"model type(s) {sorted(clash)}"
                raise ConfigError(f"family {family.name!r}: row {row.name!r} already has the {what}; pick another "
                                  f"name, or pass replace=True to stand in for it")
    for name, row in list(_REGISTERED.items()):
        if name == family.name or set(row.model_types) & set(family.model_types):
            del _REGISTERED[name]
    _REGISTERED[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Forget a row :func:`register_family` added (the table's rows stay)."""
    _REGISTERED.pop(name, None)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_family(family: Any) -> FamilySpec:
    """``family`` if it is a well-formed row, else a :class:`ConfigError` naming the field and the fix."""
    if not isinstance(family, FamilySpec):
        raise ConfigError(f"family must be a unipelt.Family row, got {type(family).__name__}")

    def text(value: Any, what: str, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value or value.startswith(".") or value.endswith("."):
            raise ConfigError(f"family {family.name!r}: {what} must be a module path relative to the layer "
                              f"(like 'attn.q_proj'), got {value!r}")

    if not isinstance(family.name, str) or not _NAME.fullmatch(family.name):
        raise ConfigError(f"family name must be letters, digits, '_', '-' or '.', got {family.name!r}")
    if not isinstance(family.model_types, tuple) or not all(isinstance(t, str) and t for t in family.model_types):
        raise ConfigError(f"family {family.name!r}: model_types must be a list of model types or class names, "
                          f"got {family.model_types!r}")
    if not isinstance(family.stacks, tuple) or not family.stacks \
            or not all(isinstance(s, StackSpec) for s in family.stacks):
        raise ConfigError(f"family {family.name!r}: stacks must be a non-empty list of unipelt.Stack rows")
    if len({s.name for s in family.stacks}) != len(family.stacks):
        raise ConfigError(f"family {family.name!r}: two stacks share a name; name them 'encoder' and 'decoder'")
    for stack in family.stacks:
        if not isinstance(stack.name, str) or not re.fullmatch(r"[A-Za-z]+", stack.name or ""):
            raise ConfigError(f"family {family.name!r}: a stack's name must be letters only ('layers', 'encoder', "
                              f"'decoder'), got {stack.name!r}")
        text(stack.layers, f"stack {stack.name!r} layers (the path of its list of layers, from the model body)")
        if not isinstance(stack.ffn_in, tuple) or not stack.ffn_in:
            raise ConfigError(f"family {family.name!r}: stack {stack.name!r} ffn_in must name at least one module")
        for path in stack.ffn_in:
            text(path, f"stack {stack.name!r} ffn_in")
        text(stack.ffn_out, f"stack {stack.name!r} ffn_out")
        text(stack.activation, f"stack {stack.name!r} activation")
        text(stack.ffn_norm, f"stack {stack.name!r} ffn_norm", optional=True)
        text(stack.ffn_output, f"stack {stack.name!r} ffn_output", optional=True)
        if not isinstance(stack.attentions, tuple) or not all(isinstance(a, AttentionSpec) for a in stack.attentions):
            raise ConfigError(f"family {family.name!r}: stack {stack.name!r} attentions must be unipelt.Attention rows")
        for att in stack.attentions:
            if att.kind not in ("self", "cross"):
                raise ConfigError(f"family {family.name!r}: an attention's kind is 'self' or 'cross', got {att.kind!r}")
            text(att.module, "attention module (the module around q, k, v and o)")
            text(att.o, "attention o")
            text(att.out, "attention out", optional=True)
            if att.qkv is not None:
                text(att.qkv, "attention qkv")
                if (att.q, att.k, att.v) != (None, None, None):
                    raise ConfigError(f"family {family.name!r}: an attention with a fused qkv leaves q, k and v None")
            else:
                for part in ("q", "k", "v"):
                    text(getattr(att, part), f"attention {part} (or a fused qkv)")
    if family.heads is not None and not all(isinstance(h, str) and h and "." not in h for h in family.heads):
        raise ConfigError(f"family {family.name!r}: heads must name top-level modules of the model, got "
                          f"{family.heads!r}")
    return family


def family_to_dict(family: FamilySpec) -> dict[str, Any]:
    """The row as JSON-ready data (what ``unipelt.json`` stores for a family the table does not have)."""
    return dataclasses.asdict(family)


def family_from_dict(data: Any) -> FamilySpec:
    """The row :func:`family_to_dict` wrote; a :class:`ConfigError` for anything else."""
    try:
        stacks = [StackSpec(**{**s, "attentions": [AttentionSpec(**a) for a in s["attentions"]]})
                  for s in data["stacks"]]
        return check_family(FamilySpec(**{**data, "stacks": stacks}))
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"not a family row ({type(e).__name__}: {e}); write it with unipelt.Family") from e


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

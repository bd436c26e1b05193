"""Configs made of other configs: free compositions, UniPELT and MAM.

A :class:`Composition` is a list of method configs applied together, each with its own gate switch
(``gate=True`` on any gateable method). UniPELT and MAM are named compositions with the papers'
defaults; they expand into a list of plain method configs, so the core knows nothing about them.

- UniPELT (:class:`UniPELTConfig`), in every layer: ``LN(h + x + G_A A(LN(h + x)))`` after the FFN (a gated
  Pfeiffer adapter), keys and values ``[G_P P_k; K]``, ``[G_P P_v; V]`` (a gated prefix), and
  ``W x + G_L B A x`` on W_q and W_v (a gated LoRA), each ``G`` the mean over the example's tokens of a
  per-token sigmoid. Reference: morningmoni/UniPELT ``examples/text-classification/run_glue.py`` (the gates
  and defaults), ``transformers/adapters/modeling.py`` (``Adapter``), ``transformers/models/bert/
  modeling_bert.py`` (``BertSelfAttention``: the prefix) and ``transformers/models/bert/lora_layers.py`` (LoRA).
- MAM (:class:`MAMConfig`): keys and values ``[P_k; K]``, ``[P_v; V]`` in every attention plus
  ``h + s A(x_ffn)`` on every FFN (a scaled parallel adapter reading the FFN's input). Reference:
  jxhe/unify-parameter-efficient-tuning ``petl/petl_factory.py`` (``Adapter_Layer``, the prefix) with
  ``exps/run_xsum.sh``, ``exps/run_glue.sh`` and ``petl/options.py`` (the settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, MethodConfig, parse_config
from .methods.adapter import AdapterConfig
from .methods.lora import LoRAConfig
from .methods.prefix import PrefixConfig
from .methods.prompt import PromptConfig
from .registry import Preset, register_composition


def _part_defaults(config_cls: type[MethodConfig], data: dict[str, Any]) -> dict[str, Any]:
    """A dict given for a part of UniPELT/MAM overrides that part's defaults there, not the plain method's.

    ``{"method": "mam", "adapter": {"bottleneck": 16}}`` keeps MAM's parallel adapter with scaling 4.
    """
    defaults = config_cls()
    out = dict(data)
    for name, value in data.items():
        default = getattr(defaults, name, None)
        if isinstance(value, dict) and isinstance(default, MethodConfig):
            out[name] = {**default.to_dict(), **value}
    return out


def expand(config: MethodConfig) -> list[MethodConfig]:
    """The plain method configs a (possibly composite) config stands for."""
    if isinstance(config, (Composition, UniPELTConfig, MAMConfig)):
        return config.expand()
    return [config]


@register_composition
@dataclass
class Composition(MethodConfig):
    method = "composition"
    description = "any list of methods applied together, each with its own UniPELT gate switch"

    methods: list[Any] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.methods, (list, tuple)):
            raise ConfigError(f"a composition's methods must be a list of method configs, got {self.methods!r}")
        if not self.methods:
            raise ConfigError("a composition needs at least one method")
        self.methods = [parse_config(m) for m in self.methods]

    def expand(self) -> list[MethodConfig]:
        out: list[MethodConfig] = []
        for m in self.methods:
            out.extend(expand(m))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "methods": [m.to_dict() for m in self.methods]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Composition:
        extra = sorted(set(data) - {"method", "methods", "gate"})
        if extra:
            raise ConfigError(f"unknown key(s) {extra} for a composition; valid keys: ['methods']")
        methods = data.get("methods", [])
        config = cls(methods=list(methods) if isinstance(methods, (list, tuple)) else methods)
        config.validate()
        return config


# UniPELT's prompt layer, as a dict or True: adapters' PromptTuningConfig, the seed's (10 tokens, U(-0.5, 0.5), joined
# after the embeddings where the model has an embeddings module). It scored above our own prompt (vocabulary rows
# among the input ids) at K=100 on MiniLM, 0.635 against 0.611, and level at K=1000, 0.738 against 0.739
# (benchmarks/results/glue_lowres, run 8).
SEED_PROMPT = {"length": 10, "init": "uniform", "join": "auto"}


def _seed_prompt(value: Any) -> Any:
    """UniPELT's prompt part: ``True`` or a dict becomes :data:`SEED_PROMPT`'s options (the dict's over them);
    anything else (None, a ``PromptConfig``) stays as it is."""
    if value is True or isinstance(value, dict):
        return {**SEED_PROMPT, **(value if isinstance(value, dict) else {})}
    return value


# Our UniPELT before it followed the authors' code, kept for its scores on MiniLM (benchmarks/results/glue_lowres):
# per-token gates for the adapter and LoRA, LoRA's gate times alpha / r, the adapter added to W_2's output (before
# the dropout, no LayerNorm inside, m = 48, zero W_up), the prefix started at real words' keys and values and gated by
# the sigmoid of its gate's mean logit; the trainer gives its prefix a tenth of the rate.
@register_composition(presets={
    "unipelt_legacy": Preset(
        "UniPELT as this library had it before the reference: per-token gates, word-initialised prefix",
        gate_pooling="token", adapter={"placement": "ffn", "bottleneck": 48, "init": "lora"},
        prefix={"init": "words", "gate_pooling": "logit_mean"}, lora={"gate_scaling": "alpha"}),
})
@dataclass
class UniPELTConfig(MethodConfig):
    """UniPELT (Mao et al. 2022): gated adapter + gated prefix + gated LoRA in every layer.

    Defaults are the authors' code's (morningmoni/UniPELT, ``examples/text-classification/run_glue.py`` and
    its vendored adapter-transformers 2.0.1): a Pfeiffer adapter inside the FFN's LayerNorm, reduction factor
    16 (m = 48 on BERT-base), ReLU, N(0, 0.02) init; a prefix of length 10 through an MLP of width 512,
    N(0, 0.02) init; LoRA r = 8 on W_q and W_v, whose gate replaces alpha / r. Each gate is one value per
    example, the mean of per-token sigmoids (``gate_pooling``). ``prompt`` adds the seed's prompt-tuning layer
    on the input (ungated): given as a dict or ``True``, :data:`SEED_PROMPT`'s (adapters' ``PromptTuningConfig``);
    a ``PromptConfig`` object is taken as it is. Set any part to ``None`` (or ``False``) to leave it out.

    Per layer: ``LN(h + x + G_A A(LN(h + x)))`` after the FFN, prefix ``G_P P_k``, ``G_P P_v`` on every attention,
    ``W x + G_L B A x`` on W_q and W_v (the module docstring has the whole formula).
    Reference: morningmoni/UniPELT ``examples/text-classification/run_glue.py``, ``transformers/adapters/
    modeling.py`` (``Adapter``), ``transformers/models/bert/modeling_bert.py`` (``BertSelfAttention``),
    ``transformers/models/bert/lora_layers.py``.
    """

    method = "unipelt"
    description = "UniPELT: gated adapter + gated prefix + gated LoRA per layer, optional prompt layer"

    adapter: AdapterConfig | None = field(default_factory=lambda: AdapterConfig(placement="pfeiffer"))
    prefix: PrefixConfig | None = field(default_factory=lambda: PrefixConfig(length=10, init="bert"))
    lora: LoRAConfig | None = field(default_factory=lambda: LoRAConfig(r=8, alpha=16.0))
    prompt: PromptConfig | None = None

    def validate(self) -> None:
        super().validate()
        self.prompt = _seed_prompt(self.prompt)
        for name, cls in (("adapter", AdapterConfig), ("prefix", PrefixConfig), ("lora", LoRAConfig),
                          ("prompt", PromptConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(_part_defaults(type(self), {name: value})[name]))
            elif value is True:
                setattr(self, name, cls())
            elif value is False:  # the part off, as None
                setattr(self, name, None)
            elif isinstance(value, cls):  # an object is taken as it is: checked as the dict form is
                value.validate()
            elif value is not None:
                raise ConfigError(f"unipelt {name} must be a dict of {cls.__name__} keys, a {cls.__name__}, True "
                                  f"(on) or None/False (off), got {value!r}")
        if not any((self.adapter, self.prefix, self.lora, self.prompt)):
            raise ConfigError("unipelt needs at least one of adapter, prefix, lora, prompt")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniPELTConfig:
        if "prompt" in data:  # before the part becomes a PromptConfig of its own defaults
            data = {**data, "prompt": _seed_prompt(data["prompt"])}
        return super().from_dict(_part_defaults(cls, data))

    def expand(self) -> list[MethodConfig]:
        out: list[MethodConfig] = []
        for part in (self.adapter, self.prefix, self.lora):
            if part is not None:
                # UniPELT's pooling, unless the part has its own
                pooling = part.gate_pooling if part.gate_pooling != "mean" else self.gate_pooling
                out.append(type(part).from_dict({**part.to_dict(), "gate": True, "gate_pooling": pooling}))
        if self.prompt is not None:
            out.append(self.prompt)
        return out


@register_composition(presets={
    "mam_glue": Preset("MAM adapter, He et al.'s GLUE setting: prefix l=16 + parallel FFN adapter m=16, s=2",
                       prefix={"length": 16}, adapter={"bottleneck": 16, "scaling": 2.0}),
})
@dataclass
class MAMConfig(MethodConfig):
    """MAM adapter (He et al. 2022): prefix on attention (l=30, MLP width 800) + scaled parallel adapter on the FFN
    (m=512, s=4), the XSum and en-ro setting of jxhe/unify-parameter-efficient-tuning (``exps/run_xsum.sh``;
    ``petl/options.py`` ``mid_dim`` 800); PyTorch's default init for the prefix, LoRA-style for the adapter.
    ``mam_glue`` is that repository's GLUE setting (``exps/run_glue.sh``): l=16, m=16, s=2 (trained there at
    1e-4).

    Per layer: ``[P_k; K]``, ``[P_v; V]`` on every attention and ``h + s A(x_ffn)`` on every FFN.
    Reference: jxhe/unify-parameter-efficient-tuning ``petl/petl_factory.py`` (``Adapter_Layer``, the prefix),
    ``exps/run_xsum.sh``, ``exps/run_glue.sh``, ``petl/options.py``.
    """

    method = "mam"
    description = "MAM adapter: prefix tuning (l=30, MLP 800) + scaled parallel FFN adapter (m=512, s=4)"

    prefix: PrefixConfig = field(default_factory=lambda: PrefixConfig(length=30, reparam_hidden=800))
    adapter: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(bottleneck=512, placement="pfeiffer", parallel=True, scaling=4.0))

    def validate(self) -> None:
        super().validate()
        parts = _part_defaults(type(self), {"prefix": self.prefix, "adapter": self.adapter})
        if isinstance(self.prefix, dict):
            self.prefix = PrefixConfig.from_dict(parts["prefix"])
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig.from_dict(parts["adapter"])
        for name, cls in (("prefix", PrefixConfig), ("adapter", AdapterConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"mam {name} must be a dict of {cls.__name__} keys or a {cls.__name__} (MAM "
                                  f"needs both parts), got {value!r}")
            value.validate()  # an object part is checked as the dict form is

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MAMConfig:
        return super().from_dict(_part_defaults(cls, data))

    def expand(self) -> list[MethodConfig]:
        return [self.prefix, self.adapter]


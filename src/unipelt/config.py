"""Method configs: dataclasses that round-trip through JSON, and their lookup by method name.

Every method registers its config class under a name (``"lora"``) with a one-line description, once, with
its module class (:func:`unipelt.registry.register_method`); this module only reads :mod:`unipelt.registry`.
``parse_config`` accepts a config object, a name (defaults), or a dict with a ``"method"`` key;
unknown methods and unknown keys are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .registry import Registered, registry  # noqa: F401  (lookups only; importing unipelt.methods fills it)

GATE_POOLINGS = ("mean", "mean_with_padding", "token", "logit_mean")  # runtime.gate_values


class ConfigError(ValueError):
    """A config that cannot be built: unknown method, unknown key, or values that do not fit."""


@dataclass
class MethodConfig:
    """Base of every method config. ``gate`` turns on a UniPELT gate where the method has one.

    ``gate_pooling`` says how a gate's per-token sigmoids become its value (``runtime.gate_values``):
    ``"mean"`` over the example's real tokens (UniPELT's per-example gate, the default),
    ``"mean_with_padding"`` (the reference's, which averages over its padding to 128 tokens too), or
    ``"token"`` (one gate per token), or ``"logit_mean"`` (the sigmoid of the mean logit: ``unipelt_legacy``'s
    prefix gate, the sigmoid of the gate's map of the mean input).
    """

    method: ClassVar[str] = ""
    description: ClassVar[str] = ""
    gateable: ClassVar[bool] = False
    # the learning rate of the method's reference recipe: the trainer's default for it (--lr overrides);
    # None: the trainer's table (train.loop.DEFAULT_LR)
    reference_lr: ClassVar[float | None] = None

    gate: bool = False
    gate_pooling: str = "mean"

    def validate(self) -> None:
        """Check values that need no model; model-dependent checks happen at attach."""
        check_field_types(self)
        if self.gate and not self.gateable:
            raise ConfigError(f"method '{self.method}' has no UniPELT gate; remove gate=True")
        if self.gate_pooling not in GATE_POOLINGS:
            raise ConfigError(f"gate_pooling must be one of {GATE_POOLINGS}, got {self.gate_pooling!r}")
        check_targets(self)

    def require_positive_ints(self, *names: str) -> None:
        """Each named field must be a positive integer (a boolean is not one)."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.method} {name} must be a positive integer, got {value!r}")
            if value > MAX_SIZE:
                raise ConfigError(f"{self.method} {name}={value} is beyond any model's size; use at most {MAX_SIZE:,}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MethodConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        data.pop("method", None)
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} for method '{cls.method}'; valid keys: {sorted(names)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            kwargs[key] = _coerce(hints.get(key), value, key, cls.method)
        config = cls(**kwargs)
        config.validate()
        return config


# the largest size (rank, bottleneck, length, ...) a config may ask for: larger ones are typos, and would fail to
# allocate with an error that does not name the field
MAX_SIZE = 1 << 20
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """``(field, allowed plain types, None allowed)`` for each field of ``cls`` whose hint is plain: bool, int,
    float, str or ``tuple[str, ...]``, optionally ``| None``. Nested configs and ``Any`` are left to the class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, Any)
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        plain = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        if plain and all(t in (bool, int, float, str, tuple) for t in plain):
            out.append((f.name, plain, type(None) in args))
    return tuple(out)


@functools.cache
def _tuple_items(cls: type) -> dict[str, type]:
    """The item type of each ``tuple[X, ...]`` field of ``cls`` (``str`` unless declared otherwise)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for a in args:
            if typing.get_origin(a) is tuple and typing.get_args(a):
                out[name] = typing.get_args(a)[0]
    return out


def check_field_types(config: MethodConfig) -> None:
    """Each plain field holds its type: an integer (not a boolean) where an ``int`` is declared, a finite number
    for a ``float``, true/false for a ``bool``, a string, a list of strings for ``tuple[str, ...]`` (made a tuple);
    else a :class:`ConfigError` that names the field and the type it needs. A ``tuple[int, ...]`` (``layers``)
    takes a list of integers."""
    items = _tuple_items(type(config))
    for name, allowed, nullable in _field_types(type(config)):
        value = getattr(config, name)
        if value is None and nullable:
            continue
        item = items.get(name, str)
        if tuple in allowed and isinstance(value, (list, tuple)) \
                and all(isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value):
            setattr(config, name, tuple(value))
            continue
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        elif isinstance(value, float):
            ok = float in allowed and math.isfinite(value)
        else:
            ok = isinstance(value, str) and str in allowed
        if not ok:
            listed = "a list of integers" if items.get(name) is int else "a list of strings"
            kinds = [_KINDS.get(t, listed) for t in allowed] + (["None"] if nullable else [])
            raise ConfigError(f"{config.method} {name} must be {' or '.join(kinds)}, got {value!r}")


def check_targets(config: MethodConfig) -> None:
    """The target fields a method may have (``targets``, ``layers``, ``exclude``; resolved against a model by
    ``ModelMap.select``): ``"re:"`` entries must compile, layer indices must be >= 0."""
    for name in ("targets", "exclude"):
        for entry in getattr(config, name, None) or ():
            if isinstance(entry, str) and entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as e:
                    raise ConfigError(f"{config.method} {name} entry {entry!r} is not a valid regular expression "
                                      f"({e}); fix the pattern after 're:'") from e
    layers = getattr(config, "layers", None)
    if layers is not None and (not layers or any(i < 0 for i in layers)):
        raise ConfigError(f"{config.method} layers must be a non-empty list of layer indices >= 0 (or None for "
                          f"every layer), got {list(layers)}")


def _coerce(hint: Any, value: Any, key: str, method: str) -> Any:
    """Turn JSON values back into the field's type: nested configs, tuples."""
    if value is None:
        return None
    args = typing.get_args(hint)
    candidates = [a for a in args if isinstance(a, type)] if args else [hint]
    for cand in candidates:
        if isinstance(cand, type) and issubclass(cand, MethodConfig) and isinstance(value, dict):
            return cand.from_dict(value)
    origin = typing.get_origin(hint)
    if (origin is tuple or tuple in candidates) and isinstance(value, list):
        return tuple(value)
    return value


def parse_config(config: MethodConfig | str | dict[str, Any]) -> MethodConfig:
    """Build a config from an object, a method name, or a dict with a ``"method"`` key."""
    if isinstance(config, MethodConfig):
        config.validate()
        return config
    reg = registry()
    if isinstance(config, str):
        config = {"method": config}
    if not isinstance(config, dict):
        raise ConfigError(f"a config is a MethodConfig, a method name or a dict, not {type(config).__name__}")
    name = config.get("method")
    if not isinstance(name, str) or name not in reg:  # a list or dict is no name (and unhashable)
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(reg))}")
    entry = reg[name]
    values = dict(entry.preset or {})
    for key, value in config.items():  # a part given as a dict refines the preset's part ({"adapter": {...}})
        if key != "method":
            values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
                else value
    return entry.config_class.from_dict(values)

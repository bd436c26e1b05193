"""Method configs: dataclasses that round-trip through JSON, and the registry of method names.

Every method registers a config class under a name (``"lora"``) with a one-line description.
``parse_config`` accepts a config object, a name (defaults), or a dict with a ``"method"`` key;
unknown methods and unknown keys are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

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
        if self.gate and not self.gateable:
            raise ConfigError(f"method '{self.method}' has no UniPELT gate; remove gate=True")
        if self.gate_pooling not in GATE_POOLINGS:
            raise ConfigError(f"gate_pooling must be one of {GATE_POOLINGS}, got {self.gate_pooling!r}")

    def require_positive_ints(self, *names: str) -> None:
        """Each named field must be a positive integer (a boolean is not one)."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{self.method} {name} must be a positive integer, got {value!r}")

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


@dataclass(frozen=True)
class Registered:
    name: str
    config_class: type[MethodConfig]
    description: str
    preset: dict[str, Any] | None = None  # a named setting of another method ("houlsby")


_REGISTRY: dict[str, Registered] = {}


def register(config_class: type[MethodConfig]) -> type[MethodConfig]:
    _REGISTRY[config_class.method] = Registered(config_class.method, config_class, config_class.description)
    return config_class


def register_preset(name: str, config_class: type[MethodConfig], description: str, **values: Any) -> None:
    _REGISTRY[name] = Registered(name, config_class, description, values)


def registry() -> dict[str, Registered]:
    from . import compositions, methods  # noqa: F401  (importing them registers every method)

    return dict(_REGISTRY)


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
    if name not in reg:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(reg))}")
    entry = reg[name]
    values = dict(entry.preset or {})
    for key, value in config.items():  # a part given as a dict refines the preset's part ({"adapter": {...}})
        if key != "method":
            values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
                else value
    return entry.config_class.from_dict(values)

"""The registry of method names: one entry per method, composition and preset.

A method registers once, next to its code, with :func:`register_method` on its module class::

    @register_method(AdapterConfig, presets={
        "pfeiffer": Preset("one serial adapter after the FFN, inside its LayerNorm", placement="pfeiffer"),
    })
    class Adapter(DeltaMethod):
        ...

That one call records the name (the config's ``method``), the config class, the module class (and sets its
``config_class``), the description (the config's ``description``) and the presets. A composition, a config
that expands into plain methods and has no module of its own, registers with :func:`register_composition` on
its config class. Duplicate names and half-registered methods raise :class:`RegistrationError` at import.

This module imports nothing of unipelt at import time: :mod:`unipelt.config` reads it for lookups, and
importing :mod:`unipelt.methods` (which ``unipelt/__init__.py`` does) fills it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MethodConfig
    from .methods.base import DeltaMethod


class RegistrationError(TypeError):
    """A method registered wrongly: a duplicate name, or a config without a module class (or the reverse)."""


@dataclass(frozen=True)
class Registered:
    name: str
    config_class: type[MethodConfig]
    description: str
    preset: dict[str, Any] | None = None  # a named setting of another method ("houlsby")
    module_class: type[DeltaMethod] | None = None  # None: a composition, which expands into plain methods


class Preset:
    """A named setting of a method: ``Preset("one serial adapter after the FFN", placement="pfeiffer")``."""

    def __init__(self, description: str, **values: Any):
        self.description = description
        self.values = values

    def __repr__(self) -> str:
        return f"Preset({self.description!r}, **{self.values!r})"


_REGISTRY: dict[str, Registered] = {}


def registry() -> dict[str, Registered]:
    """Every registered name (methods, compositions, presets) and its entry; a copy."""
    return dict(_REGISTRY)


def lookup(name: str) -> Registered | None:
    return _REGISTRY.get(name)


def _where(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"


def _add(entries: list[Registered], by: Any) -> None:
    """Add a method's entries (itself and its presets) all or none: a duplicate name adds nothing."""
    seen: dict[str, Any] = {}
    for entry in entries:
        old = _REGISTRY.get(entry.name)
        first = seen.get(entry.name) or (old is not None and old != entry and (old.module_class or old.config_class))
        if first:
            raise RegistrationError(
                f"method name {entry.name!r} is registered twice, by {_where(first)} and by {_where(by)}; "
                f"rename one (its config's `method`, or the preset's key)")
        seen[entry.name] = by
    for entry in entries:
        _REGISTRY[entry.name] = entry


def _check_config(config: Any, what: str, fix: str) -> type[MethodConfig]:
    from .config import MethodConfig  # at call time: config.py is loaded by then, and does not import this back

    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise RegistrationError(f"{what} has no config class (got {config!r}); {fix}")
    if not config.__dict__.get("method"):
        raise RegistrationError(f"config {_where(config)} has no `method` name of its own; "
                                f"set `method = \"...\"` on the class before registering it")
    return config


def _presets(config: type[MethodConfig], module: type | None, presets: dict[str, Preset] | None
             ) -> list[Registered]:
    out = []
    for name, preset in (presets or {}).items():
        if not isinstance(preset, Preset):
            raise RegistrationError(f"preset {name!r} of method {config.method!r} must be a "
                                    f"Preset(description, **values), got {preset!r}")
        out.append(Registered(name, config, preset.description, dict(preset.values), module))
    return out


def register_method(config: type[MethodConfig], *, presets: dict[str, Preset] | None = None
                    ) -> Callable[[type[DeltaMethod]], type[DeltaMethod]]:
    """Class decorator for a method's module class: registers the method under ``config.method`` with its
    config class, this module class, ``config.description`` and its presets, and sets ``config_class``."""

    def decorate(module: type[DeltaMethod]) -> type[DeltaMethod]:
        from .methods.base import DeltaMethod  # at call time: methods.base is loaded by whoever registers

        name = getattr(config, "method", None) or getattr(module, "__name__", module)
        cfg = _check_config(config, f"method {name!r} (module {_where(module)})",
                            "pass the method's MethodConfig subclass: @register_method(XConfig)")
        if not (isinstance(module, type) and issubclass(module, DeltaMethod)):
            raise RegistrationError(
                f"method {cfg.method!r}: config {cfg.__name__} has no module class ({_where(module)} is not a "
                f"DeltaMethod); put @register_method({cfg.__name__}) on the method's DeltaMethod subclass")
        own = module.__dict__.get("config_class")
        if own is not None and own is not cfg:
            raise RegistrationError(f"method {cfg.method!r}: {module.__name__}.config_class is {own.__name__}, "
                                    f"not {cfg.__name__}; drop the class attribute, the decorator sets it")
        _add([Registered(cfg.method, cfg, cfg.description, None, module), *_presets(cfg, module, presets)], module)
        module.config_class = cfg
        return module

    return decorate


def register_composition(config: type[MethodConfig] | None = None, *, presets: dict[str, Preset] | None = None
                         ) -> Any:
    """Class decorator for a composite config (no module class: it ``expand()``s into plain methods)."""

    def decorate(cls: type[MethodConfig]) -> type[MethodConfig]:
        cfg = _check_config(cls, f"composition {_where(cls)}", "put @register_composition on a MethodConfig subclass")
        if not callable(getattr(cfg, "expand", None)):
            raise RegistrationError(
                f"composition {cfg.method!r} has no expand() and no module class; give it expand(), or "
                f"register it as a method with @register_method({cfg.__name__}) on its DeltaMethod subclass")
        _add([Registered(cfg.method, cfg, cfg.description, None, None), *_presets(cfg, None, presets)], cfg)
        return cfg

    return decorate(config) if config is not None else decorate


def check_complete(candidates: Iterable[type] | None = None) -> None:
    """Raise if a config class or a method module class was defined but never registered.

    ``candidates`` default to every ``MethodConfig`` and ``DeltaMethod`` subclass defined under ``unipelt``.
    """
    from .config import MethodConfig
    from .methods.base import DeltaMethod

    if candidates is None:
        candidates = [c for base in (MethodConfig, DeltaMethod) for c in _subclasses(base)
                      if c.__module__.startswith("unipelt.")]
    configs = {e.config_class for e in _REGISTRY.values()}
    modules = {e.module_class for e in _REGISTRY.values()}
    for cls in candidates:
        if issubclass(cls, MethodConfig) and cls.__dict__.get("method") and cls not in configs:
            raise RegistrationError(
                f"method {cls.method!r}: config {_where(cls)} has no module class; put "
                f"@register_method({cls.__name__}) on its DeltaMethod subclass (or @register_composition on it)")
        if issubclass(cls, DeltaMethod) and cls not in modules:
            raise RegistrationError(
                f"module {_where(cls)} has no config; put @register_method(XConfig) on it, with its MethodConfig")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out

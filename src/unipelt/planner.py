"""``unipelt.plan(model, config)``: exactly which modules a config would touch, before attaching it.

Each method of the config (compositions expanded, as ``attach`` does) is built against the model's sites and
asked to install itself into a recording installer, which notes every module the method asks to hook and
registers nothing. So the listing is what ``attach`` hooks, by construction: the same targets, ``layers``,
``exclude`` and family row. The model is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .compositions import expand
from .config import ConfigError, MethodConfig, parse_config
from .core import attachment, deltas
from .families import FamilySpec
from .registry import lookup
from .runtime import ForwardContext, Installer
from .sites import Projection, resolve

# what a method does at a module: "weight" (a weight delta of a projection: LoRA, KronA, ...), "output" (a hook
# on its output), "input" (a hook on its input), "forward" (its forward replaced), "attention" (extra keys and
# values), "swap" (the module replaced), "call" (the model's call rewritten: prompts), "head" (a task head trained)
KINDS = ("weight", "output", "input", "forward", "attention", "swap", "call", "head")


@dataclass(frozen=True)
class Site:
    """One module a config touches: the method's name (as ``attach`` names it), the module's path in
    ``model.named_modules()`` (``""``: the model itself), what the method does there (:data:`KINDS`) and the
    module's class name."""

    method: str
    path: str
    kind: str
    module_type: str


class Plan(list):
    """The :class:`Site` rows of :func:`plan`, in the order ``attach`` would install them; printed as a table."""

    @property
    def paths(self) -> list[str]:
        """Every module path touched, once, in order (task heads included)."""
        return list(dict.fromkeys(site.path for site in self))

    def of(self, method: str) -> Plan:
        """The rows of one method."""
        return Plan(site for site in self if site.method == method)

    def __str__(self) -> str:
        if not self:
            return "(no sites)"
        rows = [("method", "kind", "module", "type")] + [(s.method, s.kind, s.path or "(model)", s.module_type)
                                                         for s in self]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(f"{r[i]:<{widths[i]}}" for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * (sum(widths) + 6 + max(len(r[3]) for r in rows)))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({len(self)} sites)\n{self}"


class _Recorder(Installer):
    """An installer that registers nothing: it notes each module a method asks for, with what it would do."""

    def __init__(self, model: nn.Module, name: str, paths: dict[int, str]):
        super().__init__(model, ForwardContext(), name)
        self.paths = paths
        self.sites: list[tuple[str, str, str]] = []

    def _note(self, module: nn.Module, kind: str, path: str | None = None) -> None:
        self.sites.append((self.paths.get(id(module), "?") if path is None else path, kind, type(module).__name__))

    def on_output(self, module, fn, kind="output"):
        self._note(module, "output")

    def on_input(self, module, fn):
        self._note(module, "input")

    def on_call(self, module, fn):
        self._note(module, "input")

    def override_forward(self, module, fn, kind="other"):
        self._note(module, "forward")

    def kv_provider(self, attention_module, provider):
        self._note(attention_module, "attention")

    def swap(self, parent, attr, new):
        old = getattr(parent, attr)
        base = self.paths.get(id(parent), "?")
        path = f"{base}.{attr}" if base else attr
        self.sites.append((path, "swap", type(old).__name__))
        return old

    def rewrite_call(self, fn):
        self._note(self.model, "call", "")

    def rewrite_output(self, fn):
        self._note(self.model, "call", "")

    def add_weight_delta(self, proj: Projection, weight_delta, output_hook, kind="output"):
        self._note(proj.module, "weight")


def plan(model: nn.Module, config: MethodConfig | str | dict[str, Any], *, train_head: bool = True,
         family: FamilySpec | None = None) -> Plan:
    """The modules ``attach(model, config, train_head=..., family=...)`` would touch, as a :class:`Plan` (a list of
    :class:`Site`: method, module path, kind, module type), without attaching anything.

    ``print(unipelt.plan(model, {"method": "lora", "targets": ["all-linear"], "exclude": ["re:.*\\.0\\..*"]}))``
    shows the table; ``.paths`` lists the module paths. Errors are those ``attach`` would raise (a target that
    matches nothing names real paths).
    """
    state = attachment(model)
    if state is not None:
        if family is not None and family.name != state.model_map.family.name:
            raise ConfigError(f"this model is attached with family {state.model_map.family.name!r}; plan with that "
                              f"family (or none)")
        model_map, taken = state.model_map, set(deltas(model))
    else:
        model_map, taken = resolve(model, family), set()
    paths = {id(m): p for p, m in model.named_modules()}
    out = Plan()
    for plain in expand(parse_config(config)):
        entry = lookup(plain.method)
        name = plain.method
        i = 1
        while name in taken:
            name, i = f"{plain.method}_{i}", i + 1
        taken.add(name)
        recorder = _Recorder(model, name, paths)
        try:
            entry.module_class(plain, model_map).install(recorder)
        finally:
            Installer.remove(recorder)  # anything an installer method not recorded here registered, taken off
        seen = set()
        for path, kind, module_type in recorder.sites:
            if (path, kind) not in seen:
                seen.add((path, kind))
                out.append(Site(name, path, kind, module_type))
    if train_head and (state is None or state.train_head):
        for head_name, head in model_map.head_modules.items():
            out.append(Site("head", head_name, "head", type(head).__name__))
    return out

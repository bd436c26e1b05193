"""Switching attached deltas on and off without detaching them.

``with unipelt.disabled(model):`` runs the bare base model: every hook of every delta is taken off (the model's
own ``forward`` back, attention routed as before attach) and the task head holds the values it had before
attach; leaving the block puts everything back in the order ``attach`` installed it, so the outputs are again
exactly the attached model's. Use it for an RLHF reference model or a baseline without a second copy.

``unipelt.set_active(model, names)`` keeps only the named deltas running (``None``: all of them);
``unipelt.active(model)`` lists the running ones. A delta switched off stays in the model's store with its
weights: it is not run, so it gets no gradient, and its parameters are frozen (``requires_grad=False``) until it
is switched on again, when they get back the ``requires_grad`` they had (peft's ``set_adapter`` freezes the
adapters it deactivates too). ``unipelt.save`` writes every delta, on or off, and ``unipelt.load`` switches
all of them on; ``unipelt.merge`` refuses while any delta is off (switch them on, or detach, first).

Both work under ``torch.compile``: the hooks are module state that the compiled frame's guards read, so a
switch recompiles (once per set of running deltas) and never reuses another set's graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from . import attention
from .config import ConfigError
from .core import Attachment, _reinstall, _uninstall, attachment, deltas


def _attached(model: nn.Module) -> Attachment:
    state = attachment(model)
    if state is None:
        raise ConfigError("no delta is attached to this model (use unipelt.attach or unipelt.load first)")
    return state


def active(model: nn.Module) -> list[str]:
    """The names of the deltas that run, in the order they were attached (empty inside ``disabled``)."""
    state = attachment(model)
    return [] if state is None else [name for name in deltas(model) if name in state.installers]


def _route_attention(model: nn.Module, state: Attachment) -> None:
    """Attention through unipelt's wrapper exactly while a running delta adds keys/values (as ``add_method`` and
    ``_remove_method`` keep it)."""
    providers = any(installer._providers for installer in state.installers.values())
    if providers and state.attention_routing is None:
        state.attention_routing = attention.route_through_unipelt(model)
    elif not providers and state.attention_routing is not None:
        attention.restore_routing(model, state.attention_routing)
        state.attention_routing = None


def _switch(model: nn.Module, state: Attachment, names: list[str]) -> None:
    """Install exactly the stored deltas ``names`` (in store order), every other one off."""
    _uninstall(state)
    _reinstall(model, state, [name for name in deltas(model) if name in names])
    _route_attention(model, state)


def set_active(model: nn.Module, names: str | Iterable[str] | None) -> list[str]:
    """Run only the attached deltas ``names`` (a name, a list of names, or ``None`` for all); returns them.

    The others stay attached, unchanged, and frozen until switched on again. Outputs with a set of deltas on are
    exactly those of a model with only those deltas attached, in their attach order.
    """
    state = _attached(model)
    if state.disabled_depth:
        raise ConfigError("cannot choose the active deltas inside unipelt.disabled(model); leave the block first")
    store = deltas(model)
    chosen = list(store) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in chosen if n not in store]
    if unknown:
        raise ConfigError(f"no attached delta named {unknown}; attached: {list(store)}")
    if active(model) == [name for name in store if name in chosen]:
        return active(model)  # nothing to switch: the hooks stay (no recompile under torch.compile)
    for name, method in store.items():
        if name not in chosen and name not in state.switched_off_grads:  # switching off: freeze, remember
            state.switched_off_grads[name] = {n: p.requires_grad for n, p in method.named_parameters()}
            for p in method.parameters():
                p.requires_grad_(False)
        elif name in chosen and name not in state.installers:  # switching on: trainable as before
            grads = state.switched_off_grads.pop(name, {})
            for n, p in method.named_parameters():
                p.requires_grad_(grads.get(n, True))
    _switch(model, state, chosen)
    return active(model)


def _bare_heads(state: Attachment) -> list[tuple[nn.Module, str, nn.Parameter, torch.Tensor]]:
    """Put the head's values from before attach in place (as new frozen parameters, so that the trained ones are
    never written to and an optimizer keeps its own); returns what to put back."""
    swapped = []
    for head_name, head in state.model_map.head_modules.items():
        for param_name, trained in list(head.named_parameters()):
            owner_path, _, leaf = param_name.rpartition(".")
            owner = head.get_submodule(owner_path) if owner_path else head
            base = state.head_snapshot.get(f"{head_name}.{param_name}")
            if base is None or owner._parameters.get(leaf) is not trained:
                continue
            base = base.to(device=trained.device, dtype=trained.dtype)
            if torch.equal(base, trained):
                continue  # untouched: nothing to swap (and nothing for a compiled graph to re-check)
            owner._parameters[leaf] = nn.Parameter(base, requires_grad=False)
            swapped.append((owner, leaf, trained, base))
    return swapped


@contextlib.contextmanager
def disabled(model: nn.Module, heads: bool = True) -> Iterator[nn.Module]:
    """``with unipelt.disabled(model):`` the model runs as the bare base model, exactly; after it, as before.

    Every delta's hooks come off (nothing is detached or copied) and, with ``heads`` (the default), the task
    head holds its values from before attach; ``heads=False`` keeps the trained head. Attaching, loading,
    merging and ``set_active`` are refused inside the block; ``detach`` inside it ends the switching.
    """
    state = _attached(model)
    names = active(model)
    _uninstall(state)
    routing = state.attention_routing
    if routing is not None:
        attention.restore_routing(model, routing)
        state.attention_routing = None
    swapped = _bare_heads(state) if heads else []
    state.disabled_depth += 1
    try:
        yield model
    finally:
        state.disabled_depth -= 1
        detached = attachment(model) is not state
        for owner, leaf, trained, base in reversed(swapped):
            owner._parameters[leaf] = trained
            if detached:  # detach restored the head in place: the bare values belong in the trained parameters
                with torch.no_grad():
                    trained.copy_(base)
        if not detached:
            _switch(model, state, names)

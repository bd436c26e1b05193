"""Resolve a model into the sites methods attach to: layers, projections, FFN, activations.

The family table says where things are; this module finds them in a concrete model and wraps
linear-like modules (``nn.Linear`` and GPT-2's ``Conv1D``, or a slice of a fused q/k/v projection)
in a :class:`Projection` that gives every method the same view: ``W`` as ``(out, in)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quantized as quant
from .families import HEAD_MODULES, AttentionSpec, FamilySpec, UnsupportedModelError, family_of, get_submodule

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")  # target names that act in every layer
ALL_LINEAR = "all-linear"  # every linear module inside the layers (task heads, pooler and embeddings left out)
REGEX = "re:"  # a target or exclude entry starting with this is a regular expression over module paths
STORE = "unipelt_deltas"  # the attached deltas' own modules (core.STORE): never a site


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores its weight as (in, out); detected by name to avoid importing model code.
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """A module a :class:`Projection` can wrap: ``nn.Linear`` (or a subclass) or GPT-2's ``Conv1D``."""
    return (isinstance(module, nn.Linear) or _is_conv1d(module)) and isinstance(getattr(module, "weight", None),
                                                                                torch.Tensor)


@dataclass
class Projection:
    """A linear map ``y = W x + b`` inside the model, or a slice of a fused one's outputs."""

    module: nn.Module
    path: str
    out_slice: slice | None = None

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def quantized(self) -> str | None:
        """``"4-bit"`` or ``"8-bit"`` for a bitsandbytes layer whose weight is stored packed, else None
        (:mod:`unipelt.quantized`)."""
        return quant.kind(self.module)

    @property
    def in_features(self) -> int:
        # the layer's own sizes where it has them: a quantized layer's weight is packed ((out * in / 2, 1) bytes)
        n = getattr(self.module, "in_features", None)
        if isinstance(n, int) and not self.transposed:
            return n
        w = self.module.weight
        return w.shape[0] if self.transposed else w.shape[1]

    @property
    def full_out_features(self) -> int:
        n = getattr(self.module, "out_features", None)
        if isinstance(n, int) and not self.transposed:
            return n
        w = self.module.weight
        return w.shape[1] if self.transposed else w.shape[0]

    @property
    def out_features(self) -> int:
        if self.out_slice is None:
            return self.full_out_features
        return self.out_slice.stop - self.out_slice.start

    def weight(self) -> torch.Tensor:
        """``W`` restricted to this projection's outputs, as ``(out, in)`` (a view for Linear; for a quantized
        layer a dequantized float copy, made anew at every call)."""
        w = self.module.weight if self.quantized is None else quant.dequantize(self.module)
        w = w.t() if self.transposed else w
        return w if self.out_slice is None else w[self.out_slice]

    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        if b is None or self.out_slice is None:
            return b
        return b[self.out_slice]

    def place(self, delta: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Widen a delta over this slice to the module's full output (pad with ``fill``)."""
        if self.out_slice is None:
            return delta
        left, right = self.out_slice.start, self.full_out_features - self.out_slice.stop
        return F.pad(delta, (left, right), value=fill)

    @property
    def foldable(self) -> bool:
        """Whether a weight delta can run inside this projection's own GEMM (:meth:`linear_with`): a plain
        ``nn.Linear`` or ``Conv1D``, nothing that computes its output another way (a quantized layer's weight delta
        goes on its output)."""
        return type(self.module) is nn.Linear or _is_conv1d(self.module)

    def linear_with(self, x: torch.Tensor, delta_out_in: torch.Tensor) -> torch.Tensor:
        """The module's output with ``W + delta`` for ``W`` (``delta``: ``(out, in)`` for this slice): one GEMM.

        Under autocast the sum stays in the weight's dtype and the GEMM casts it, as it casts ``W`` alone;
        otherwise the delta takes the weight's dtype first.
        """
        w = self.module.weight
        w = w.t() if self.transposed else w
        if delta_out_in.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            delta_out_in = delta_out_in.to(w.dtype)
        if self.out_slice is not None:
            rows_after = self.full_out_features - self.out_slice.stop
            delta_out_in = F.pad(delta_out_in, (0, 0, self.out_slice.start, rows_after))
        return F.linear(x, w + delta_out_in, self.module.bias)

    @torch.no_grad()
    def _rewrite_quantized(self, change) -> None:
        """A quantized layer's ``W <- change(W)`` (``W`` dequantized, ``(out, in)``, the whole layer), quantized
        again in the layer's format: rounds to the nearest code, at most one quantization step per weight."""
        w = quant.dequantize(self.module)
        quant.requantize(self.module, change(w.float()))

    @torch.no_grad()
    def add_to_weight(self, delta_out_in: torch.Tensor) -> None:
        """``W += delta`` in place, with ``delta`` shaped ``(out, in)`` for this slice (a quantized layer:
        dequantize, add, quantize again)."""
        if self.quantized is not None:
            full = self.place(delta_out_in.float().t()).t() if self.out_slice is not None else delta_out_in.float()
            self._rewrite_quantized(lambda w: w + full.to(w.device))
            return
        w = self.module.weight
        delta_out_in = delta_out_in.to(w.dtype)
        if self.transposed:
            target = w[:, self.out_slice] if self.out_slice is not None else w
            target.add_(delta_out_in.t())
        else:
            target = w[self.out_slice] if self.out_slice is not None else w
            target.add_(delta_out_in)


    @torch.no_grad()
    def scale_outputs(self, scale: torch.Tensor) -> None:
        """``W <- diag(scale) W`` and ``b <- scale * b`` over this projection's outputs."""
        w, b = self.module.weight, self.module.bias
        if self.quantized is not None:
            full = self.place(scale.float(), fill=1.0)
            self._rewrite_quantized(lambda w: w * full.to(w.device)[:, None])
            if b is not None:
                b.mul_(full.to(b.dtype))
            return
        full = self.place(scale.to(w.dtype), fill=1.0)
        if self.transposed:
            w.mul_(full[None, :])
        else:
            w.mul_(full[:, None])
        if b is not None:
            b.mul_(full)

    @torch.no_grad()
    def scale_inputs(self, scale: torch.Tensor) -> None:
        """``W <- W diag(scale)``: the same as scaling this projection's input."""
        if self.quantized is not None:
            self._rewrite_quantized(lambda w: w * scale.float().to(w.device)[None, :])
            return
        w = self.module.weight
        scale = scale.to(w.dtype)
        if self.transposed:
            w.mul_(scale[:, None])
        else:
            w.mul_(scale[None, :])


@dataclass
class AttentionSites:
    kind: str
    module: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    out: nn.Module | None = None  # the sub-layer's output after its dropout (families.AttentionSpec.out)

    @property
    def output_module(self) -> nn.Module:
        """The module whose output is this attention sub-layer's output, just before the residual add."""
        return self.out if self.out is not None else self.o.module

    def projection(self, name: str) -> Projection:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}[name]


@dataclass
class LayerSites:
    stack: str
    index: int
    attentions: list[AttentionSites]
    ffn_in: list[Projection]
    ffn_out: Projection
    activation_parent: nn.Module
    activation_attr: str
    module: nn.Module
    ffn_output: nn.Module | None = None  # the FFN's output after its dropout (families.StackSpec.ffn_output)
    ffn_norm: nn.Module | None = None  # the LayerNorm around the FFN's residual (families.StackSpec.ffn_norm)
    norm_first: bool = False  # pre-LN: ffn_norm reads the FFN's input; post-LN: it reads x + FFN(x)
    causal: bool = False  # a token of this layer sees only the tokens before it (decoders)

    @property
    def ffn_output_module(self) -> nn.Module:
        """The module whose output is the FFN sub-layer's output, just before the residual add."""
        return self.ffn_output if self.ffn_output is not None else self.ffn_out.module

    @property
    def key(self) -> str:
        """Short id used in parameter names: ``layers0``, ``encoder3``, ``decoder1``."""
        return f"{self.stack}{self.index}"

    @property
    def hidden_size(self) -> int:
        return self.ffn_out.out_features


@dataclass
class ModelMap:
    """Everything a method needs to know about a model, resolved once at attach time."""

    model: nn.Module
    family: FamilySpec
    layers: list[LayerSites]
    hidden_size: int
    head_modules: dict[str, nn.Module] = field(default_factory=dict)
    quantized: str | None = None  # "4-bit", "8-bit": the model holds bitsandbytes layers (unipelt.quantized)

    def input_embeddings(self) -> nn.Module:
        emb = self.model.get_input_embeddings()
        if emb is None:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no input embeddings")
        return emb

    def base_modules(self) -> list[tuple[str, nn.Module]]:
        """``(path, module)`` of every module of the pretrained body, task heads excluded."""
        heads = tuple(self.head_modules)
        return [(p, m) for p, m in self.model.named_modules()
                if p and not p.startswith(heads) and not p.startswith("unipelt_deltas")]

    def causal(self, module: nn.Module) -> bool:
        """Whether ``module`` sits in a causal layer (a decoder's), where a token must not read later ones."""
        for layer in self.layers:
            if any(m is module for m in layer.module.modules()):
                return layer.causal
        return False

    def stacks(self) -> list[str]:
        return sorted({layer.stack for layer in self.layers}, key=lambda s: {"layers": 0, "encoder": 1}.get(s, 2))

    def attention_count(self) -> int:
        return sum(len(layer.attentions) for layer in self.layers)

    def projections(self, targets: Iterable[str], layers: Iterable[int] | None = None,
                    exclude: Iterable[str] = ()) -> list[tuple[str, Projection]]:
        """Resolve target names to projections, each with a stable key (:meth:`select`'s sites)."""
        return [(site.key, site.projection) for site in self.select(targets, layers, exclude)]

    def select(self, targets: Iterable[str], layers: Iterable[int] | None = None,
               exclude: Iterable[str] = ()) -> list[TargetSite]:
        """The projections a method's ``targets`` (restricted to ``layers``, less ``exclude``) select, in order.

        Each target is one of:

        - a role name, acting in every layer: ``q``, ``k``, ``v``, ``o`` (of every attention, self and cross),
          ``ffn_in``, ``ffn_out``;
        - ``"all-linear"``: every linear module inside the layers (task heads, pooler, embeddings left out, as
          ``peft``'s ``all-linear`` leaves out the output layer);
        - ``"re:PATTERN"``: every linear module whose full path (``model.named_modules()``'s) matches the regular
          expression ``PATTERN`` as a whole (``re.fullmatch``);
        - any other name: the linear modules whose path is it or ends with ``"." + name`` (``"query"``,
          ``"attention.self.query"``), as ``peft``'s ``target_modules``.

        ``layers``: keep only sites in these layers (indices within each stack: ``[0]`` is the first encoder and
        the first decoder layer). ``exclude``: drop sites matching any entry (a role name, a path suffix or a
        ``"re:"`` pattern). A target that matches nothing, an exclude entry that removes nothing, a layer the
        model lacks, or a module named twice is an :class:`UnsupportedModelError` naming the fix.
        """
        targets, exclude = _entries(targets, "targets"), _entries(exclude, "exclude")
        paths = {id(m): p for p, m in self.model.named_modules() if not p.startswith(STORE)}
        layer_of = {id(m): layer for layer in self.layers for m in layer.module.modules()}
        roles: dict[int, tuple[str, str, LayerSites]] = {}  # unsliced role projections: id -> (key, role, layer)
        role_sites: list[TargetSite] = []
        for layer in self.layers:
            for att in layer.attentions:
                for t in ("q", "k", "v", "o"):
                    role_sites.append(TargetSite(f"{layer.key}_{att.kind}_{t}", att.projection(t), t, t, layer))
            for i, proj in enumerate(layer.ffn_in):
                role_sites.append(TargetSite(f"{layer.key}_ffn_in{i}", proj, "ffn_in", "ffn_in", layer))
            role_sites.append(TargetSite(f"{layer.key}_ffn_out", layer.ffn_out, "ffn_out", "ffn_out", layer))
        for site in role_sites:
            if site.projection.out_slice is None:
                roles.setdefault(id(site.projection.module), (site.key, site.role, site.layer))

        def module_site(target: str, path: str, module: nn.Module, role_key: bool) -> TargetSite:
            key, role, layer = roles.get(id(module), (None, None, layer_of.get(id(module))))
            return TargetSite(key if role_key and key else path.replace(".", "__"), Projection(module, path), target,
                              role, layer)

        linear = [(p, m) for p, m in self.model.named_modules() if p and not p.startswith(STORE) and is_linear(m)]
        found: list[TargetSite] = []
        for target in targets:
            if target in ROLES:
                hits = [site for site in role_sites if site.role == target]
                hits = [dataclasses.replace(site, target=target) for site in hits]
            elif target == ALL_LINEAR:
                hits = [module_site(target, paths[id(m)], m, True) for layer in self.layers
                        for m in layer.module.modules() if is_linear(m) and id(m) in paths]
            elif target.startswith(REGEX):
                pattern = _compile(target, "target")
                hits = [module_site(target, p, m, True) for p, m in linear if pattern.fullmatch(p)]
            else:
                hits = [module_site(target, p, m, False) for p, m in linear
                        if p == target or p.endswith("." + target)]
            if not hits:
                raise UnsupportedModelError(
                    f"target {target!r} matches no linear module of {type(self.model).__name__}; use a role "
                    f"({', '.join(ROLES)}), {ALL_LINEAR!r}, a module name or '{REGEX}' + a regular expression over "
                    f"paths such as {_examples(self, linear)}")
            found.extend(hits)
        seen: dict[tuple[int, int | None], TargetSite] = {}
        for site in found:
            proj = site.projection
            ident = (id(proj.module), proj.out_slice.start if proj.out_slice is not None else None)
            if ident in seen:
                raise UnsupportedModelError(
                    f"targets {targets} select {proj.path} twice (through {seen[ident].target!r} and "
                    f"{site.target!r}); name each module once")
            seen[ident] = site
        if layers is not None:
            found = self._in_layers(found, layers)
        for entry in exclude:
            pattern = _compile(entry, "exclude") if entry.startswith(REGEX) else None
            kept = [site for site in found if not _excluded(site, entry, pattern)]
            if len(kept) == len(found):
                raise UnsupportedModelError(
                    f"exclude {entry!r} removes none of the {len(found)} sites the targets select (such as "
                    f"{[s.path for s in found[:3]]}); give a role ({', '.join(ROLES)}), a module name or "
                    f"'{REGEX}' + a regular expression over these paths")
            found = kept
        if not found:
            raise UnsupportedModelError(f"targets {targets} with layers={None if layers is None else list(layers)} "
                                        f"and exclude={exclude} leave no site; widen the targets or the layers")
        return found

    def _in_layers(self, found: list[TargetSite], layers: Iterable[int]) -> list[TargetSite]:
        if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in layers):
            raise UnsupportedModelError(f"layers must be a list of layer indices, got {layers!r}")
        wanted, have = set(layers), {layer.index for layer in self.layers}
        missing = sorted(wanted - have)
        if missing:
            raise UnsupportedModelError(f"layers {missing} are not layers of {type(self.model).__name__}, whose "
                                        f"layers are 0..{max(have)} (per stack); drop them")
        return [site for site in found if site.layer is not None and site.layer.index in wanted]


@dataclass
class TargetSite:
    """One projection a method's targets select (:meth:`ModelMap.select`).

    ``key`` names it in the method's parameters; ``target`` is the entry that selected it; ``role`` is q, k, v,
    o, ffn_in or ffn_out where it is one of the layer's role projections (else ``None``); ``layer`` the layer it
    sits in (``None`` outside the layers).
    """

    key: str
    projection: Projection
    target: str
    role: str | None = None
    layer: LayerSites | None = None

    @property
    def path(self) -> str:
        return self.projection.path


def _entries(values: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not all(isinstance(v, str) and v for v in values):
        raise UnsupportedModelError(f"{what} must be a list of non-empty names, got {list(values)!r}")
    return values


def _compile(entry: str, what: str) -> re.Pattern:
    try:
        return re.compile(entry[len(REGEX):])
    except re.error as e:
        raise UnsupportedModelError(f"{what} {entry!r} is not a valid regular expression ({e}); fix the pattern "
                                    f"after '{REGEX}'") from e


def _excluded(site: TargetSite, entry: str, pattern: re.Pattern | None) -> bool:
    if pattern is not None:
        return pattern.fullmatch(site.path) is not None
    if entry in ROLES:
        return site.role == entry
    return site.path == entry or site.path.endswith("." + entry)


def _examples(model_map: ModelMap, linear: list[tuple[str, nn.Module]]) -> list[str]:
    """A few real paths of linear modules, from the first layer where it has some."""
    first = {id(m) for m in model_map.layers[0].module.modules()} if model_map.layers else set()
    inside = [p for p, m in linear if id(m) in first]
    return (inside or [p for p, _ in linear])[:3]


def _projection(layer: nn.Module, rel: str, full_prefix: str, model_name: str) -> Projection:
    module = get_submodule(layer, rel)
    if module is None or not hasattr(module, "weight"):
        raise UnsupportedModelError(
            f"{model_name}: expected a linear module at '{full_prefix}.{rel}' but found none; "
            f"its family row (unipelt/families.py, or the row given as family=) does not match this model"
        )
    return Projection(module, f"{full_prefix}.{rel}")


def _attention_sites(spec: AttentionSpec, layer: nn.Module, prefix: str, model_name: str) -> AttentionSites:
    module = get_submodule(layer, spec.module)
    if module is None:
        raise UnsupportedModelError(f"{model_name}: no attention module at '{prefix}.{spec.module}'")
    o = _projection(layer, spec.o, prefix, model_name)
    if spec.qkv is not None:
        fused = _projection(layer, spec.qkv, prefix, model_name)
        d = fused.full_out_features // 3
        q, k, v = (Projection(fused.module, fused.path, slice(i * d, (i + 1) * d)) for i in range(3))
    else:
        q, k, v = (_projection(layer, p, prefix, model_name) for p in (spec.q, spec.k, spec.v))
    out = get_submodule(layer, spec.out) if spec.out else None
    return AttentionSites(spec.kind, module, q, k, v, o, out)


def resolve(model: nn.Module, family: FamilySpec | None = None) -> ModelMap:
    """Find every site of ``model`` through its family's row (``family``, else the registered rows and the
    table); clear errors where it does not fit. Paths are relative to ``model.base_model``, or to the model
    itself for an ``nn.Module`` that has none."""
    family = family_of(model, family)
    if family.supports_prefix and not _has_transformers_config(model):
        family = dataclasses.replace(family, supports_prefix=False, prefix_reason=(
            f"{type(model).__name__} has no transformers config, so its attention does not run through "
            f"transformers' attention interface, where prefixes join"))
    base = getattr(model, "base_model", model)
    base_path = "" if base is model else model.base_model_prefix
    name = type(model).__name__
    layers: list[LayerSites] = []
    for stack in family.stacks:
        layer_list = get_submodule(base, stack.layers)
        if layer_list is None:
            if stack.name == "decoder" and len(family.stacks) > 1:
                continue  # encoder-only use of an encoder-decoder family (T5EncoderModel)
            raise UnsupportedModelError(
                f"{name}: no layer list at '{stack.layers}' (family '{family.name}'); "
                f"update its row (unipelt/families.py, or the row given as family=)"
            )
        if not isinstance(layer_list, (nn.ModuleList, nn.Sequential)):
            raise UnsupportedModelError(f"{name}: '{stack.layers}' (family '{family.name}') is a "
                                        f"{type(layer_list).__name__}, not the list of layers; name the ModuleList")
        for index, layer in enumerate(layer_list):
            prefix = ".".join(p for p in (base_path, stack.layers, str(index)) if p)
            ffn_in = [Projection(m, f"{prefix}.{p}") for p in stack.ffn_in
                      if (m := get_submodule(layer, p)) is not None]
            if not ffn_in:
                raise UnsupportedModelError(f"{name}: no FFN input projection among {stack.ffn_in} at '{prefix}'")
            parent_path, _, attr = stack.activation.rpartition(".")
            parent = get_submodule(layer, parent_path) if parent_path else layer
            if parent is None or not hasattr(parent, attr):
                raise UnsupportedModelError(f"{name}: no FFN activation at '{prefix}.{stack.activation}'")
            attentions = [_attention_sites(a, layer, prefix, name) for a in stack.attentions]
            layers.append(LayerSites(
                stack=stack.name,
                index=index,
                attentions=attentions,
                ffn_in=ffn_in,
                ffn_out=_projection(layer, stack.ffn_out, prefix, name),
                activation_parent=parent,
                activation_attr=attr,
                module=layer,
                ffn_output=get_submodule(layer, stack.ffn_output) if stack.ffn_output else None,
                ffn_norm=get_submodule(layer, stack.ffn_norm) if stack.ffn_norm else None,
                norm_first=stack.norm_first,
                causal=stack.name == "decoder" or any(bool(getattr(a.module, "is_causal", False))
                                                      for a in attentions if a.kind == "self"),
            ))
    if not layers:
        raise UnsupportedModelError(f"{name}: found no layers")
    head_names = HEAD_MODULES if family.heads is None else family.heads
    heads = {n: m for n, m in model.named_children() if n in head_names}
    return ModelMap(model, family, layers, layers[0].hidden_size, heads, quant.model_kind(model))


def _has_transformers_config(model: nn.Module) -> bool:
    from transformers import PretrainedConfig

    return isinstance(getattr(model, "config", None), PretrainedConfig)

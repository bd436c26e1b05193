"""Resolve a model into the sites methods attach to: layers, projections, FFN, activations.

The family table says where things are; this module finds them in a concrete model and wraps
linear-like modules (``nn.Linear`` and GPT-2's ``Conv1D``, or a slice of a fused q/k/v projection)
in a :class:`Projection` that gives every method the same view: ``W`` as ``(out, in)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import HEAD_MODULES, AttentionSpec, FamilySpec, UnsupportedModelError, family_of, get_submodule


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores its weight as (in, out); detected by name to avoid importing model code.
    return type(module).__name__ == "Conv1D"


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
    def in_features(self) -> int:
        w = self.module.weight
        return w.shape[0] if self.transposed else w.shape[1]

    @property
    def full_out_features(self) -> int:
        w = self.module.weight
        return w.shape[1] if self.transposed else w.shape[0]

    @property
    def out_features(self) -> int:
        if self.out_slice is None:
            return self.full_out_features
        return self.out_slice.stop - self.out_slice.start

    def weight(self) -> torch.Tensor:
        """``W`` restricted to this projection's outputs, as ``(out, in)`` (a view for Linear)."""
        w = self.module.weight
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
        ``nn.Linear`` or ``Conv1D``, nothing that computes its output another way."""
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
    def add_to_weight(self, delta_out_in: torch.Tensor) -> None:
        """``W += delta`` in place, with ``delta`` shaped ``(out, in)`` for this slice."""
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

    def projections(self, targets: tuple[str, ...] | list[str]) -> list[tuple[str, Projection]]:
        """Resolve target names to projections, each with a stable key.

        Role names act in every layer: ``q``, ``k``, ``v``, ``o`` (of every attention, self and
        cross), ``ffn_in`` and ``ffn_out``. Any other name matches modules whose path ends with it
        (``"query"``, ``"c_attn"``), as ``peft``'s ``target_modules`` do.
        """
        roles = {"q", "k", "v", "o", "ffn_in", "ffn_out"}
        found: list[tuple[str, Projection]] = []
        for target in targets:
            before = len(found)
            if target in roles:
                for layer in self.layers:
                    if target == "ffn_out":
                        found.append((f"{layer.key}_ffn_out", layer.ffn_out))
                    elif target == "ffn_in":
                        for i, proj in enumerate(layer.ffn_in):
                            found.append((f"{layer.key}_ffn_in{i}", proj))
                    else:
                        for att in layer.attentions:
                            found.append((f"{layer.key}_{att.kind}_{target}", att.projection(target)))
            else:
                for path, module in self.model.named_modules():
                    if (path == target or path.endswith("." + target)) and hasattr(module, "weight") \
                            and (isinstance(module, nn.Linear) or _is_conv1d(module)):
                        found.append((path.replace(".", "__"), Projection(module, path)))
            if len(found) == before:
                raise UnsupportedModelError(
                    f"target {target!r} matches no linear module of {type(self.model).__name__}; "
                    f"use one of {sorted(roles)} or a module name such as "
                    f"{[n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)][:3]}"
                )
        keys = [k for k, _ in found]
        if len(set(keys)) != len(keys):
            raise UnsupportedModelError(f"targets {list(targets)} name the same module twice")
        return found


def _projection(layer: nn.Module, rel: str, full_prefix: str, model_name: str) -> Projection:
    module = get_submodule(layer, rel)
    if module is None or not hasattr(module, "weight"):
        raise UnsupportedModelError(
            f"{model_name}: expected a linear module at '{full_prefix}.{rel}' but found none; "
            f"the family table in unipelt/families.py does not match this model"
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


def resolve(model: nn.Module) -> ModelMap:
    """Find every site of ``model`` through the family table; clear errors where it does not fit."""
    family = family_of(model)
    base = model.base_model
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
                f"update its row in unipelt/families.py"
            )
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
    heads = {n: m for n, m in model.named_children() if n in HEAD_MODULES}
    return ModelMap(model, family, layers, layers[0].hidden_size, heads)

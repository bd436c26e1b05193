"""What methods use to act on a running model: hooks, per-forward context, gates.

Methods never patch a model themselves. They ask an :class:`Installer` for forward hooks on a
module's input or output, for extra attention keys/values, for a swapped sub-module, or for a
rewrite of the model's call arguments. The installer records every change so that ``detach``
undoes all of them exactly.

The speed path comes last, each part under a ``# --- speed path`` comment: ``Installer.add_weight_delta`` (a
weight delta trained inside the projection's GEMM) and, at the end of the module, ``stacked_linear`` and
``shared_by_input`` (several small products over one input as one GEMM, computed once per input).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from . import attention
from .sites import Projection


@dataclass
class ForwardContext:
    """Values that live for one call of the model (reset by the core before every forward)."""

    padding_mask: torch.Tensor | None = None  # (batch, seq) 1 = real token, of the main input
    values: dict[Any, Any] = field(default_factory=dict)  # per-forward cache (prefix reparametrisation)
    reads: dict[Any, int] = field(default_factory=dict)  # how often each value of ``once`` was read
    # multi-task serving: method name -> (batch,) bool, the rows of the batch that method acts on; a method
    # absent here acts on every row
    row_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    task_ids: torch.Tensor | None = None  # the call's task_ids (one per row), for methods that route by task
    # gradient checkpointing: the backward recomputes each layer on its own, so a value computed in one layer
    # and read in another would differ between the pass and the recompute: every read computes its own
    per_layer: bool = False

    def once(self, key: Any, compute: Callable[[], Any], uses: int | None = None) -> Any:
        """``compute()`` the first time ``key`` is asked for in this forward pass, the stored value after.

        With ``uses`` (how many reads a pass makes, e.g. one per layer) the value is dropped at its last
        read, and a read after that computes it anew. Why: under ``torch.compile`` the model's forward is a
        frame of its own, and a tensor still held here when it returns leaves the graph as an extra output,
        for which the backward then builds and copies a zero gradient (per tensor, on the host).
        """
        if key not in self.values:
            self.values[key] = compute()
            self.reads[key] = 0
        value = self.values[key]
        self.reads[key] += 1
        if uses is not None and self.reads[key] >= uses:
            del self.values[key], self.reads[key]
        return value

    def reset(self, attention_mask: Any = None) -> None:
        """Start a new forward pass: clear the per-pass values; take the mask if it is a padding mask."""
        self.padding_mask = None
        self.values.clear()
        self.reads.clear()
        self.row_masks = {}
        self.task_ids = None
        self.per_layer = False
        self.use_mask(attention_mask)

    def use_mask(self, attention_mask: Any) -> None:
        """Take ``attention_mask`` as the padding mask when it is one: (batch, seq)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.padding_mask = attention_mask


def matmul_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype a delta's matmul with ``weight`` runs in: under autocast the matmul casts by
    itself (a float32 copy of a bf16 activation would be wasted traffic); otherwise the weight's."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class Gate(nn.Module):
    """UniPELT gate: ``sigmoid(W x + b)`` per token, which :func:`gate_values` pools per example.

    ``W ~ N(0, 0.02)``, ``b = 0``: the reference re-initialises every gate so (morningmoni/UniPELT,
    ``transformers/models/bert/modeling_bert.py`` ``_init_weights`` and ``adapters/modeling.py``
    ``init_bert_weights``).
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return torch.nn.functional.linear(matmul_input(x, w), w, self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def sequence_mean(values: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence (dim 1) of per-token values ``(batch, seq, k)``, counting only real tokens when
    ``padding_mask`` (batch, seq) fits: ``(batch, 1, k)``. A row padded or not gives the same mean."""
    if padding_mask is None or padding_mask.shape != values.shape[:2]:
        return values.mean(1, keepdim=True)
    m = padding_mask.to(values.dtype).unsqueeze(-1)
    return (values * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)


def gate_per_token(pooling: str, causal: bool) -> bool:
    """Whether :func:`gate_values` gives one gate per token (else one per example)."""
    return causal or pooling == "token"


def gate_values(gate_logit: torch.Tensor, pooling: str, padding_mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
    """UniPELT's gate from its per-token logits ``(batch, seq, 1)``.

    The reference averages the per-token sigmoids over the sequence: one gate per example,
    ``G = mean_t sigmoid(W x_t + b)``, shape ``(batch, 1, 1)`` (morningmoni/UniPELT,
    ``transformers/adapters/modeling.py`` L123-124, ``lora_layers.py`` L166-169, ``modeling_bert.py`` L320).
    ``pooling``: ``"mean"`` over the real tokens (the default: a padded row gives what it gives alone);
    ``"mean_with_padding"`` over every position, as the reference, which pads every batch to 128 tokens;
    ``"token"``, one gate per token; ``"logit_mean"``, the sigmoid of the mean logit over the real tokens, which is
    ``sigmoid(w_g . mean_t x_t + b_g)`` (``unipelt_legacy``'s prefix gate). In a causal layer a mean would read later
    tokens, so the gate stays per token there whatever ``pooling`` says (the reference is an encoder).
    """
    if gate_per_token(pooling, causal):
        return torch.sigmoid(gate_logit)
    if pooling == "logit_mean":
        return torch.sigmoid(sequence_mean(gate_logit, padding_mask))
    g = torch.sigmoid(gate_logit)
    if pooling == "mean_with_padding":
        return g.mean(1, keepdim=True)
    return sequence_mean(g, padding_mask)


ModelCallRewrite = Callable[[dict[str, Any]], dict[str, Any]]
ModelOutputRewrite = Callable[[dict[str, Any], Any], Any]


class Installer:
    """Registers a method's hooks on a model and remembers how to take them all off."""

    def __init__(self, model: nn.Module, context: ForwardContext, name: str = ""):
        self.model = model
        self.context = context
        self.name = name  # the method's name in the model's store
        self._handles: list[Any] = []
        self._providers: list[tuple[nn.Module, attention.KVProvider]] = []
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self._overrides: list[nn.Module] = []
        self.call_rewrites: list[ModelCallRewrite] = []
        self.output_rewrites: list[ModelOutputRewrite] = []
        self.hooked: list[tuple[nn.Module, str]] = []  # (module, "output" | "input" | "other"), for merge

    def row_mask(self) -> torch.Tensor | None:
        """Multi-task serving: the rows of the batch this method acts on, (batch,) bool; None for every row."""
        return self.context.row_masks.get(self.name)

    def rows(self, like: torch.Tensor) -> torch.Tensor | None:
        """:meth:`row_mask` as a 0/1 tensor shaped to broadcast over ``like`` (batch first), in its dtype."""
        mask = self.row_mask()
        if mask is None:
            return None
        if mask.shape[0] != like.shape[0]:
            raise RuntimeError(f"task_ids has {mask.shape[0]} rows but a tensor of method '{self.name}' has "
                               f"{like.shape[0]}; pass one task id per row of the batch")
        return mask.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def own_rows(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (batch first) on this method's rows of the batch, zero on other tasks' rows."""
        mask = self.rows(delta)
        return delta if mask is None else delta * mask

    def on_output(self, module: nn.Module, fn: Callable[[nn.Module, tuple, Any], Any], kind: str = "output") -> None:
        """``fn(module, inputs, output) -> new output`` after ``module`` runs. ``kind="other"`` when ``fn`` does
        more than add to the output (DoRA rescales it): merge then folds it only where nothing else hooks
        ``module``."""
        self._handles.append(module.register_forward_hook(fn))
        self.hooked.append((module, kind))

    def on_input(self, module: nn.Module, fn: Callable[[nn.Module, tuple], tuple | None]) -> None:
        """``fn(module, inputs) -> new inputs`` (or None to keep them) before ``module`` runs."""
        self._handles.append(module.register_forward_pre_hook(fn))
        self.hooked.append((module, "input"))

    def on_call(self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], tuple | None]) -> None:
        """``fn(module, args, kwargs) -> (args, kwargs)`` (or None) before ``module`` runs, keywords included."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        self.hooked.append((module, "input"))

    @staticmethod
    def forward_replaced(module: nn.Module) -> bool:
        """Whether some method runs ``module`` through :meth:`override_forward` already."""
        return "forward" in module.__dict__

    def override_forward(self, module: nn.Module, fn: Callable[..., Any], kind: str = "other") -> None:
        """Run ``fn`` instead of ``module.forward`` (hooks on the module still fire); undone by remove.
        ``kind="output"`` when ``fn`` only adds to the module's output (what merge may reorder)."""
        if self.forward_replaced(module):
            raise RuntimeError(f"{type(module).__name__} already has its forward replaced")
        module.forward = fn
        self._overrides.append(module)
        self.hooked.append((module, kind))

    def kv_provider(self, attention_module: nn.Module, provider: attention.KVProvider) -> None:
        attention.add_provider(attention_module, provider)
        self._providers.append((attention_module, provider))
        self.hooked.append((attention_module, "other"))

    def swap(self, parent: nn.Module, attr: str, new: nn.Module) -> nn.Module:
        """Replace ``parent.attr`` by ``new``; returns the original, which detach puts back."""
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self._swaps.append((parent, attr, old))
        self.hooked += [(parent, "other"), (old, "other")]
        return old

    def rewrite_call(self, fn: ModelCallRewrite) -> None:
        """``fn(kwargs) -> kwargs`` on every call of the whole model (prompt tokens)."""
        self.call_rewrites.append(fn)

    def rewrite_output(self, fn: ModelOutputRewrite) -> None:
        self.output_rewrites.append(fn)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, provider in self._providers:
            attention.remove_provider(module, provider)
        for parent, attr, old in reversed(self._swaps):
            setattr(parent, attr, old)
        for module in self._overrides:
            del module.__dict__["forward"]
        self._handles.clear()
        self._providers.clear()
        self._swaps.clear()
        self._overrides.clear()
        self.call_rewrites.clear()
        self.output_rewrites.clear()
        self.hooked.clear()

    # --- speed path: a weight delta trained inside the projection's own GEMM, the same function as adding
    # ``x Delta W^T`` to the output (what ``output_hook`` does where folding does not apply).
    def add_weight_delta(self, proj: Projection, weight_delta: Callable[[], torch.Tensor],
                         output_hook: Callable[[nn.Module, tuple, Any], Any], kind: str = "output") -> None:
        """A delta ``Delta W`` of ``proj``'s weight (``weight_delta()``, ``(out, in)``, scaled), trained inside
        the projection's own GEMM: ``x (W + Delta W)^T + b``.

        Beside the frozen model's step this costs one weight-gradient GEMM and a few d x d elementwise
        kernels, where ``output + x Delta W^T`` (or its factored form) adds GEMMs over the activations in
        both passes. ``output_hook`` (the same delta on the output) serves where folding would change the
        function or cannot act per row: a module another method already hooks on its output or whose
        forward it replaced (folding would move this delta in front of that one), a module that is not a
        plain Linear/Conv1D, and calls that serve several tasks' rows. ``kind`` as :meth:`on_output`'s.
        """
        module = proj.module
        if not proj.foldable or self.forward_replaced(module) or module._forward_hooks:
            self.on_output(module, output_hook, kind)
            return
        plain_forward = type(module).forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.row_mask() is not None:
                return output_hook(module, (x,), plain_forward(x))
            return proj.linear_with(x, weight_delta())

        self.override_forward(module, forward, kind=kind)


def call_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's call as keyword arguments only (positional ones named by its signature)."""
    if not args:
        return dict(kwargs)
    names = [p for p in inspect.signature(model.forward).parameters if p not in ("self",)]
    out = dict(zip(names, args, strict=False))
    out.update(kwargs)
    return out


# --- speed path: several products over one input as one GEMM (``stacked_linear``: LoRA's A's and gates, an
# adapter's W_down and gate row) and one computation for the sites that read the same input (``shared_by_input``):
# the same function as one ``F.linear`` per weight and per site, in fewer and better-shaped kernels.


def stacked_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None,
                   widths: list[int]) -> tuple[torch.Tensor, ...]:
    """``x [W_1; W_2; ...]^T + [b_1; ...]`` as one GEMM over ``x``, split into pieces of ``widths`` columns.

    The stacked output is padded with zero rows of the weight to a multiple of 8 columns: an odd width
    (an adapter's m plus its gate's 1, LoRA's 2r plus two gates) puts the GEMMs of both passes on
    kernels for 2-byte-aligned rows, several times slower than the aligned ones. Split, not sliced: the
    backward is one concatenation.
    """
    w = torch.cat(weights)
    pad = -w.shape[0] % 8
    bias = torch.cat(biases) if biases is not None else None
    if pad:
        w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
        bias = torch.cat([bias, bias.new_zeros(pad)]) if bias is not None else None
    out = torch.nn.functional.linear(matmul_input(x, w), w, bias)
    return out.split([*widths, pad], dim=-1)[:len(widths)] if pad else out.split(widths, dim=-1)


def shared_by_input(cache: dict[Any, Any], slot: Any, readers: int,
                    compute: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``read(x)``: ``compute(x)`` once for the ``readers`` sites of a group that read the same input tensor
    in one forward pass (q, k and v of an attention), the stored result for the others.

    ``cache`` is the per-forward ``ForwardContext.values``. A read whose input is another tensor (a
    cross-attention's keys read the encoder's states) computes anew. The result is dropped at the group's
    last read, so no layer's input stays alive past its own sites.
    """

    def read(x: torch.Tensor) -> Any:
        hit = cache.get(slot)
        if hit is None or hit[0] is not x:
            hit = [x, compute(x), readers]
            cache[slot] = hit
        hit[2] -= 1
        if hit[2] == 0:
            del cache[slot]
        return hit[1]

    return read

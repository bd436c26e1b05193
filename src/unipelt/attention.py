"""Extra keys and values for attention, through the ``AttentionInterface`` of ``transformers``.

Prefix-style methods give an attention module ``l`` extra key/value vectors. Rather than touching
``past_key_values`` (whose layout differs between families and versions), unipelt registers, for
each attention implementation a model uses (``eager``, ``sdpa``, ``flex_attention``), a wrapper under
the name ``unipelt_<impl>``. The wrapper asks the providers registered for the calling module for
their keys and values, prepends them, widens the mask (and T5's position bias) by ``l`` visible
columns, and calls the original implementation. FlexAttention instead runs over the model's keys alone,
under the model's own block mask, and the prefixes are merged in by its log-sum-exp (the widened block
mask is its fallback). Implementations that read only a padding mask (FlashAttention's) are refused
with the fix named. Prefixes never enter the key/value
cache, so generation with a cache works unchanged: every step sees the prefix in front of the cached
keys.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError

# provider(module, query, key, value) -> (prefix_key, prefix_value, query_gate[, rows]): keys and values shaped
# (batch, kv_heads, l, head_dim); query_gate None or (batch, q_len, 1) scaling what they add per query; rows
# (multi-task serving) None or (batch,) bool: the rows that see these keys (masked out for the others).
KVProvider = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

# implementations whose mask can be widened by the prefix's columns (a full mask, or FlexAttention's block mask)
WIDENABLE = ("eager", "sdpa", "flex_attention")

_PROVIDERS: weakref.WeakKeyDictionary[nn.Module, list[KVProvider]] = weakref.WeakKeyDictionary()
PREFIX = "unipelt_"


def add_provider(module: nn.Module, provider: KVProvider) -> None:
    _PROVIDERS.setdefault(module, []).append(provider)


def remove_provider(module: nn.Module, provider: KVProvider) -> None:
    providers = _PROVIDERS.get(module, [])
    if provider in providers:
        providers.remove(provider)
    if not providers and module in _PROVIDERS:
        del _PROVIDERS[module]


def _original_function(module: nn.Module, impl: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        # Each model file defines its own eager function; use the calling module's.
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; "
                               f"use attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(1, 1, q_len, kv_len) bool: the queries are the last ``q_len`` positions and see the keys up to theirs."""
    position = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= position)[None, None]


def _widen_mask(mask: torch.Tensor | None, n: int, query: torch.Tensor, key: torch.Tensor,
                causal: bool) -> torch.Tensor | None:
    """Add ``n`` always-visible key columns in front of ``mask``."""
    if mask is None:
        if not causal or query.shape[2] == 1:
            return None  # no mask: every key is visible, the prefix too
        # sdpa dropped the mask to use is_causal; with a prefix the causal pattern must be explicit.
        mask = _causal_mask(query.shape[2], key.shape[2], query.device)
    if mask.dtype == torch.bool:
        return F.pad(mask, (n, 0), value=True)
    return F.pad(mask, (n, 0), value=0.0)


def _widen_block_mask(mask: Any, n: int, spans: list[tuple[int, int, torch.Tensor]], query: torch.Tensor,
                      key: torch.Tensor, causal: bool) -> Any:
    """FlexAttention's block mask with ``n`` key columns in front, visible to every query (to the rows of
    ``spans`` only, for a served task's prefix). Built once per mask: the layers of a forward pass share it.

    Two forms of the new mask function, because Inductor's GPU and CPU code generation each reject one
    under ``torch.compile``: the GPU rejects a function reading a dense table of the model's mask
    ("'function' object has no attribute 'graph'"), the CPU one asking the model's mask function at
    shifted key indices, with a padding mask (a C++ type clash). Compiled on the CPU, the table; everywhere
    else, the shifted form, which also needs no table of batch x queries x keys bytes.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if mask is not None and not isinstance(mask, BlockMask):
        raise TypeError(f"flex_attention with extra keys needs a BlockMask or no mask, got {type(mask).__name__}")
    if mask is None and not causal and not spans:
        return None  # every key visible, the prefix too
    # kept on the mask object, which lives for one forward pass (a module-level cache would be guarded on
    # by torch.compile, and recompile every pass)
    cache_key = (n, tuple((start, length, id(rows)) for start, length, rows in spans))
    cached = getattr(mask, "_unipelt_widened", None)
    if cached is not None and cached[0] == cache_key:
        return cached[1]
    spans = [(start, length, rows.to(query.device)) for start, length, rows in spans]
    if query.device.type == "cpu" and torch.compiler.is_compiling():
        with_prefix = _prefix_mask_from_table(mask, n, spans, query, key, causal)
    else:
        with_prefix = _prefix_mask_shifted(mask, n, spans, query, key, causal)
    widened = create_block_mask(with_prefix, query.shape[0], None, query.shape[2], key.shape[2] + n,
                                device=query.device, BLOCK_SIZE=mask.BLOCK_SIZE if mask is not None else 128)
    if mask is not None:
        mask._unipelt_widened = (cache_key, widened)
    return widened


def _prefix_mask_shifted(mask: Any, n: int, spans: list[tuple[int, int, torch.Tensor]], query: torch.Tensor,
                         key: torch.Tensor, causal: bool) -> Callable:
    """The model's mask function asked at the key index shifted past the prefix (clamped, so that the prefix
    columns never index the model's padding tensors out of range), the prefix columns visible."""
    models = mask.mask_mod if mask is not None else None
    offset = key.shape[2] - query.shape[2]  # without a mask of the model's: the queries are the last ones

    def with_prefix(batch, head, q, kv):
        shifted = kv - n
        if models is not None:
            seen = models(batch, head, q, shifted.clamp(min=0))
        elif causal:  # a decoding step's single query sees every key
            seen = shifted <= q + offset
        else:
            seen = shifted >= 0
        visible = (kv < n) | seen
        for start, length, rows in spans:  # another task's prefix: hidden from this row
            visible = visible & ((kv < start) | (kv >= start + length) | rows[batch])
        return visible

    return with_prefix


def _prefix_mask_from_table(mask: Any, n: int, spans: list[tuple[int, int, torch.Tensor]], query: torch.Tensor,
                            key: torch.Tensor, causal: bool) -> Callable:
    """The same mask, read from a (batch, 1, queries, prefix + keys) boolean table of it."""
    from torch.nn.attention.flex_attention import create_mask

    b, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if mask is not None:
        table = create_mask(mask.mask_mod, b, 1, q_len, kv_len, device=query.device)
    elif causal:
        table = _causal_mask(q_len, kv_len, query.device).expand(b, 1, q_len, kv_len)
    else:
        table = torch.ones(b, 1, q_len, kv_len, dtype=torch.bool, device=query.device)
    table = F.pad(table, (n, 0), value=True)
    if spans:
        table = _hide_from_rows(table, spans, query, kv_len + n)

    def with_prefix(batch, head, q, kv):
        return table[batch, 0, q, kv]

    return with_prefix


def _hide_from_rows(mask: torch.Tensor | None, spans: list[tuple[int, int, torch.Tensor]], query: torch.Tensor,
                    kv_len: int) -> torch.Tensor:
    """Mask key columns ``[start, start + length)`` for the rows not in ``rows``: another task's prefix."""
    b = query.shape[0]
    if mask is None:
        mask = torch.ones(b, 1, query.shape[2], kv_len, dtype=torch.bool, device=query.device)
    mask = mask.expand(b, *mask.shape[1:]).clone()
    for start, length, rows in spans:
        block = mask[..., start:start + length]  # a view: filled in place
        others = ~rows.view(b, 1, 1, 1).to(mask.device)
        block.masked_fill_(others, False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min)
    return mask


def _share_from_weights(weights: torch.Tensor | None, start: int, provider_values: torch.Tensor,
                        out_shape: torch.Size) -> torch.Tensor | None:
    """What one provider's values add to the attention output, ``weights[..., its keys] @ its values``, laid
    out as the output (batch, queries, heads, head_dim); None when the weights are not at hand.

    The weights are the ones the output was computed with (after dropout, if any), so the part is
    exactly what the provider added to it.
    """
    b, q_len, heads, hd = out_shape
    if weights is None or weights.dim() != 4 or weights.shape[1] != heads or weights.shape[2] != q_len:
        return None
    kv_heads, length = provider_values.shape[1], provider_values.shape[2]
    mine = weights[..., start:start + length].to(provider_values.dtype)  # (b, heads, q, l)
    grouped = mine.reshape(b, kv_heads, heads // kv_heads, q_len, length)  # query heads that share a kv head
    part = grouped @ provider_values.unsqueeze(2)  # (b, kv_heads, group, q, head_dim)
    return part.reshape(b, heads, q_len, hd).transpose(1, 2)


def _flex_attention_with_lse(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             block_mask: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FlexAttention's output, laid out (batch, queries, heads, head_dim), and its log-sum-exp (float32 or wider)
    (batch, heads, queries); None where the call needs what only ``transformers``' own wrapper does (a
    score modification, attention sinks) or the log-sum-exp is not available (Inductor's CPU FlexAttention
    is inference-only and returns none). ``transformers`` hands the log-sum-exp back in the values'
    dtype, which in bf16 is too coarse to take ``exp(score - lse)`` from: hence this call of our own."""
    from torch.nn.attention import flex_attention as flex

    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias", "score_mod")):
        return None
    if kwargs.get("dropout", 0.0) > 0:
        return None  # transformers' call refuses it with its own message
    if query.device.type == "cpu":
        if torch.compiler.is_compiling():
            return None
        call = flex.flex_attention  # unfused: the CPU's only FlexAttention with a log-sum-exp
    else:
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        # compiled once outside a compiled graph (unfused FlexAttention materialises every score)
        def call(*args, **kw):
            return compile_friendly_flex_attention(*args, training=module.training, **kw)

    aux = {"return_aux": flex.AuxRequest(lse=True)} if hasattr(flex, "AuxRequest") else {"return_lse": True}
    out, lse = call(query, key, value, block_mask=block_mask, scale=kwargs.get("scaling"),
                    enable_gqa=query.shape[1] != key.shape[1], kernel_options=kwargs.get("kernel_options"), **aux)
    lse = getattr(lse, "lse", lse)
    return out.transpose(1, 2).contiguous(), lse


def _merge_prefix(query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, keys: list[torch.Tensor],
                  values: list[torch.Tensor], gates: list[torch.Tensor | None], rows: list[torch.Tensor | None],
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the providers' keys in front of the model's, from the model's keys alone.

    ``out`` (batch, queries, heads, head_dim) and ``lse`` (batch, heads, queries) are attention over the
    model's keys under its own mask, and its log-sum-exp. The softmax over all keys weights that output by
    the model's keys' share of the total mass, ``exp(lse - lse_all)``, and each prefix key by
    ``exp(q k^T s - lse_all)``: the same function as one call over the concatenated keys, with no
    concatenation and the model's own (causal, block-aligned) mask. A per-query gate ``g`` (batch, queries, 1)
    scales what its provider's values add; ``rows`` (batch,) hides a provider from the other rows.
    Returns the output, laid out as ``out``, and the log-sum-exp over all keys. In float32 (or wider),
    outside autocast: the weights are exponentials of score differences.
    """
    b, heads, q_len, hd = query.shape
    kv_heads = keys[0].shape[1]
    group = heads // kv_heads
    scale = hd ** -0.5 if scale is None else scale
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        grouped = query.to(dtype).reshape(b, kv_heads, group, q_len, hd)  # query heads sharing a kv head
        scores = []
        for k, seen in zip(keys, rows, strict=True):
            s = grouped @ k.to(dtype).unsqueeze(2).transpose(-1, -2) * scale  # (b, kv_heads, group, q, l)
            if seen is not None:
                s = s.masked_fill(~seen.to(s.device).view(b, 1, 1, 1, 1), float("-inf"))
            scores.append(s)
        own = lse.to(dtype).reshape(b, kv_heads, group, q_len, 1)
        total = torch.logsumexp(torch.cat([own, *scores], dim=-1), dim=-1, keepdim=True)
        total = total.clamp(min=torch.finfo(dtype).min)  # a row that sees no key at all: weights 0, not NaN
        merged = out.transpose(1, 2).to(dtype).reshape(b, kv_heads, group, q_len, hd) * torch.exp(own - total)
        for s, v, gate in zip(scores, values, gates, strict=True):
            part = torch.exp(s - total) @ v.to(dtype).unsqueeze(2)  # (b, kv_heads, group, q, head_dim)
            if gate is not None:
                part = part * gate.to(dtype).view(b, 1, 1, q_len, 1)
            merged = merged + part
    merged = merged.reshape(b, heads, q_len, hd).transpose(1, 2).to(out.dtype)
    return merged, total.reshape(b, heads, q_len)


def _flex_with_prefix_apart(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: Any, keys: list[torch.Tensor], values: list[torch.Tensor],
                            gates: list[torch.Tensor | None], rows: list[torch.Tensor | None], causal: bool,
                            kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FlexAttention over the model's keys under its own block mask, and the prefixes merged in by the
    log-sum-exp (``_merge_prefix``); None where that cannot run (no log-sum-exp at hand, or no mask of the
    model's for a causal prefill, which the widened mask then spells out)."""
    from torch.nn.attention.flex_attention import BlockMask

    if mask is None and causal and query.shape[2] > 1:
        return None
    if mask is not None and not isinstance(mask, BlockMask):
        return None  # a dense mask: the widened path names the problem
    own = _flex_attention_with_lse(module, query, key, value, mask, kwargs)
    if own is None:
        return None
    out, total = _merge_prefix(query, own[0], own[1], keys, values, gates, rows, kwargs.get("scaling"))
    return out, total.to(value.dtype)  # transformers' FlexAttention returns its log-sum-exp in this slot


def _wrapper(impl: str) -> Callable:
    def attention_with_prefix(module, query, key, value, attention_mask, **kwargs):
        providers = _PROVIDERS.get(module)
        fn = _original_function(module, impl)
        if not providers:
            return fn(module, query, key, value, attention_mask, **kwargs)
        if impl not in WIDENABLE:
            raise ConfigError(f"attention implementation {impl!r} cannot take a prefix's extra keys (it reads a "
                              f"padding mask, not a full one); call model.set_attn_implementation('sdpa') "
                              f"(or one of {WIDENABLE}) before attaching")
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        keys, values, query_gates, seen_by, hidden = [], [], [], [], []
        starts = [0]  # each provider's first key column; the last entry is all providers' length
        for provider in providers:
            pk, pv, query_gate, *rows = provider(module, query, key, value)
            keys.append(pk.to(key.dtype))
            values.append(pv.to(value.dtype))
            query_gates.append(query_gate)
            seen_by.append(rows[0] if rows else None)
            if seen_by[-1] is not None:
                hidden.append((starts[-1], pk.shape[2], seen_by[-1]))
            starts.append(starts[-1] + pk.shape[2])
        n = starts[-1]
        if impl == "flex_attention":
            apart = _flex_with_prefix_apart(module, query, key, value, attention_mask, keys, values, query_gates,
                                            seen_by, causal, kwargs)
            if apart is not None:
                return apart
            attention_mask = _widen_block_mask(attention_mask, n, hidden, query, key, causal)
        else:
            attention_mask = _widen_mask(attention_mask, n, query, key, causal)
            if hidden:
                attention_mask = _hide_from_rows(attention_mask, hidden, query, n + key.shape[2])
        if attention_mask is not None:
            kwargs["is_causal"] = False
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor) and bias.shape[-1] == key.shape[2]:
            kwargs["position_bias"] = F.pad(bias, (n, 0), value=0.0)
        all_keys = torch.cat([*keys, key], dim=2)
        out, weights = fn(module, query, all_keys, torch.cat([*values, value], dim=2), attention_mask, **kwargs)
        # A per-query gate g scales what one provider's values add to each query's output. Attention
        # is linear in the values, so that is out + (g - 1) * attention(values of that provider only).
        # Where the implementation returns its attention weights (eager), that part is those weights on the
        # provider's keys times its values; otherwise (SDPA, FlexAttention where its log-sum-exp is not at
        # hand) it takes a second call.
        for i, query_gate in enumerate(query_gates):
            if query_gate is None:
                continue
            part = _share_from_weights(weights, starts[i], values[i], out.shape)
            if part is None:
                only = [v if j == i else torch.zeros_like(v) for j, v in enumerate(values)]
                part, _ = fn(module, query, all_keys, torch.cat([*only, torch.zeros_like(value)], dim=2),
                             attention_mask, **kwargs)
            out = out + (query_gate.to(out.dtype).unsqueeze(-1) - 1.0) * part
        return out, weights

    return attention_with_prefix


def ensure_registered(impl: str) -> str:
    """Register ``unipelt_<impl>`` (attention and mask functions); return that name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(impl))
    masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if impl in masks and name not in masks:
        AttentionMaskInterface.register(name, masks[impl])
    return name


def _configs(model: nn.Module) -> list:
    from transformers import PretrainedConfig

    seen, out = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def route_through_unipelt(model: nn.Module) -> dict[int, str]:
    """Point every config of ``model`` at the wrapped implementation; return the originals by config id."""
    originals: dict[int, str] = {}
    for cfg in _configs(model):
        impl = cfg._attn_implementation or "eager"
        if impl.startswith(PREFIX):
            continue
        originals[id(cfg)] = impl
        cfg._attn_implementation = ensure_registered(impl)
    return originals


def restore_routing(model: nn.Module, originals: dict[int, str]) -> None:
    for cfg in _configs(model):
        if id(cfg) in originals:
            cfg._attn_implementation = originals[id(cfg)]

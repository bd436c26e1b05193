"""Quantized base layers: bitsandbytes' 4-bit ``Linear4bit`` (nf4, fp4) and 8-bit ``Linear8bitLt``.

Such a layer is an ``nn.Linear`` whose ``weight`` is packed: a 4-bit weight is a ``Params4bit`` of
``(out * in / 2, 1)`` bytes with its block scales in ``weight.quant_state``; an 8-bit one an ``Int8Params`` of
int8 rows with one scale per row (``weight.SCB``, or ``layer.state.SCB`` after the first forward). So
:class:`~unipelt.sites.Projection` reads the layer's sizes from ``in_features`` / ``out_features``, never from the
weight's shape; methods add to the layer's own output (an output hook: a quantized layer is not ``foldable``); and
what reads W (DoRA's column norm, PiSSA/OLoRA's factors, the prefix's ``init="words"``) reads :func:`dequantize`'s
float copy, as peft does for its QLoRA layers.

Writing W (``unipelt.merge``) dequantizes, adds (or scales) and quantizes again in the layer's own format
(:func:`requantize`: the same block size, code and storage): the merged model differs from the unmerged one by
that rounding, at most one quantization step of each weight (``core.merge`` warns). Nothing here imports
bitsandbytes unless a model holds its layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .families import UnsupportedModelError

FOUR_BIT = "4-bit"
EIGHT_BIT = "8-bit"


def kind(module: nn.Module) -> str | None:
    """``"4-bit"`` for a bitsandbytes ``Linear4bit`` (any ``Params4bit`` weight), ``"8-bit"`` for a
    ``Linear8bitLt`` whose weight holds int8 rows; ``None`` for a layer that stores W as it is."""
    weight = getattr(module, "weight", None)
    name = type(weight).__name__
    if name == "Params4bit":
        return FOUR_BIT
    if name == "Int8Params" and weight.dtype == torch.int8:
        return EIGHT_BIT
    return None


def model_kind(model: nn.Module) -> str | None:
    """The quantization of the model's linear layers (``"4-bit"``, ``"8-bit"``, ``"4-bit and 8-bit"``), or None."""
    kinds = sorted({k for m in model.modules() if (k := kind(m)) is not None})
    return " and ".join(kinds) if kinds else None


def _unpack_cpu_layout(module: nn.Module) -> None:
    """bitsandbytes (0.49+) repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first eval-mode call (its
    block scales rounded to bf16); put it back in the standard layout (the layer repacks it at its next such call),
    as bitsandbytes' own save does."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        if hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state


def _row_scales(module: nn.Module) -> torch.Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise RuntimeError(f"{type(module).__name__}: an 8-bit weight without its row scales (SCB)")
    return scb


def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's ``W`` as a float ``(out, in)`` tensor (a new tensor; for 4-bit in the dtype it was quantized
    from, for 8-bit float32): bitsandbytes' own dequantization of the stored codes and scales."""
    q = kind(module)
    weight = module.weight
    if q == FOUR_BIT:
        if not getattr(weight, "bnb_quantized", True):  # not quantized yet (before its move to a device)
            return weight.data.clone()
        import bitsandbytes.functional as bnbf

        _unpack_cpu_layout(module)
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if q == EIGHT_BIT:
        scb = _row_scales(module).to(weight.device)
        import bitsandbytes.functional as bnbf

        if hasattr(bnbf, "int8_vectorwise_dequant"):
            return bnbf.int8_vectorwise_dequant(weight.data, scb)
        return weight.data.float() * (scb.float()[:, None] / 127.0)
    return weight.detach().clone()


@torch.no_grad()
def requantize(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Store ``new_weight`` (``(out, in)``, float) as the layer's weight in its own format: 4-bit with the same
    block size, code (nf4/fp4), nested statistics and storage dtype; 8-bit with fresh row scales. Both quantize
    when moved to the weight's device, as bitsandbytes does (peft's ``tuners/lora/bnb.py`` merge the same)."""
    import bitsandbytes as bnb

    q, old = kind(module), module.weight
    device = old.device
    if q == FOUR_BIT:
        _unpack_cpu_layout(module)
        old = module.weight
        dtype = old.quant_state.dtype if old.quant_state is not None else new_weight.dtype
        new = bnb.nn.Params4bit(new_weight.detach().to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=module)
        module.weight = new.to(device)
        if hasattr(module, "quant_state"):
            module.quant_state = module.weight.quant_state
    elif q == EIGHT_BIT:
        new = bnb.nn.Int8Params(new_weight.detach().to("cpu", torch.float16), requires_grad=False,
                                has_fp16_weights=old.has_fp16_weights)
        module.weight = new.to(device)
        state = getattr(module, "state", None)
        if state is not None:  # the layer takes the new codes and scales at its next call (init_8bit_state)
            state.reset_grads()
    else:
        raise TypeError(f"{type(module).__name__} is not a quantized layer")


def check_method(method_class: type, name: str, model_kind: str) -> None:
    """An :class:`~unipelt.families.UnsupportedModelError` naming the method and the reason, unless its class says
    it runs on quantized layers (``quantized_base = True``, :class:`~unipelt.methods.base.DeltaMethod`)."""
    support = getattr(method_class, "quantized_base", False)
    if support is True:
        return
    reason = support if isinstance(support, str) and support else (
        f"{method_class.__name__} does not declare quantized_base = True (that it reads and writes W only through "
        f"unipelt.sites.Projection), and a quantized layer stores W packed")
    raise UnsupportedModelError(f"method '{name}' cannot run on this {model_kind} (bitsandbytes) base: {reason}")

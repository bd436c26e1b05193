"""The contract every method keeps with the core.

A method is an ``nn.Module`` that holds only its own parameters (and gates), built from its config
and the resolved :class:`~unipelt.sites.ModelMap`. The core calls:

- ``install(installer)`` to put its hooks on the model;
- ``merge()`` to fold it into the base weights, when ``mergeable()`` says it can;
- ``delta_state()`` / ``load_delta_state()`` for what ``save`` writes (defaults: its state dict).

``quantized_base`` says whether it runs on a quantized base (bitsandbytes 4-/8-bit layers, :mod:`unipelt.quantized`):
``True`` when it reads and writes W only through :class:`~unipelt.sites.Projection` (``weight()``,
``add_to_weight``, ``scale_outputs``, ``scale_inputs``), which dequantize and quantize again; a string gives the
reason it cannot; left ``False`` (not declared), attaching it to a quantized model is an error, since a method that
touches ``module.weight`` itself would read or write packed bytes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..runtime import Installer, matmul_input  # noqa: F401 (methods import it from here)
from ..sites import ModelMap, Projection


class DeltaMethod(nn.Module):
    config_class: ClassVar[type[MethodConfig]]
    quantized_base: ClassVar[bool | str] = False  # True: runs on bitsandbytes 4-/8-bit layers; a str: why it cannot

    def __init__(self, config: MethodConfig, model_map: ModelMap):
        super().__init__()
        self.config = config

    def install(self, installer: Installer) -> None:
        raise NotImplementedError

    def mergeable(self) -> bool:
        """True when ``merge`` can fold this delta exactly into the base weights."""
        return False

    def merge(self) -> None:
        raise NotImplementedError(f"{self.config.method} cannot be merged")

    def delta_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"saved delta does not fit method '{self.config.method}': missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )


def attention_input_groups(sites: dict[str, Projection]) -> list[list[str]]:
    """The sites in groups that usually read one input tensor: q, k and v of one attention together (when
    their input widths agree), every other site alone. Methods run a group's input GEMMs as one."""
    groups: dict[str, list[str]] = {}
    for site_key in sites:
        stem, target = site_key.rsplit("_", 1)
        groups.setdefault(stem if target in ("q", "k", "v") else site_key, []).append(site_key)
    split = []
    for group in groups.values():
        if len({sites[k].in_features for k in group}) == 1:
            split.append(group)
        else:
            split.extend([k] for k in group)
    return split


def key(*parts: object) -> str:
    """A ModuleDict key from parts (no dots allowed there)."""
    return "_".join(str(p) for p in parts)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def add_matmul(output: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``output + scale * h @ weight.T`` as one GEMM that takes ``output`` as its addend (cuBLAS' beta=1),
    where the dtypes allow; else as a matmul, a scale and an add."""
    if output.dtype == weight.dtype or torch.is_autocast_enabled(output.device.type):
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t(), alpha=scale)
        return flat.view(output.shape)
    delta = torch.nn.functional.linear(h, weight)
    return output + cast_like(delta * scale if scale != 1.0 else delta, output)


def add_up_projection(output: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, scale: float,
                      proj: Projection) -> torch.Tensor:
    """``output + scale * h @ weight.T`` into ``proj``'s part of the output: one GEMM that takes ``output`` as
    its addend (:func:`add_matmul`) where the site owns the whole output, else into its slice of a fused
    projection."""
    if proj.out_slice is None:
        return add_matmul(output, h, weight, scale)
    return output + proj.place(cast_like(torch.nn.functional.linear(h, weight) * scale, output))


def cast_like(delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return delta if delta.dtype == like.dtype else delta.to(like.dtype)

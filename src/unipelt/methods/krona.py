"""KronA (Edalati et al. 2022): a Kronecker-product update of chosen projections.

``h = W x + s (A (x) B) x`` with ``A``: a_out x a_in and ``B``: (d_out / a_out) x (d_in / a_in), on
W_q and W_v by default. The product is never formed: with ``X`` the input reshaped to
(a_in, d_in / a_in), ``(A (x) B) vec(X) = vec(A X B^T)``, two small GEMMs per call. ``A`` starts at
zero (the model starts as the base model), ``B`` Kaiming-uniform like ``nn.Linear``. Mergeable:
``W' = W + s A (x) B``. Parameters per matrix: ``a_out a_in + (d_out / a_out)(d_in / a_in)``; the sizes
must divide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig, register
from ..runtime import Gate, Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input


@register
@dataclass
class KronAConfig(MethodConfig):
    method = "krona"
    description = "KronA: Kronecker-product update A (x) B of chosen projections (default W_q, W_v), mergeable"
    gateable = True

    a_out: int = 32  # rows of A; d_out / a_out rows of B
    a_in: int = 32  # columns of A; d_in / a_in columns of B
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        super().validate()
        for name in ("a_out", "a_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"krona {name} must be a positive integer, got {value!r}")
        if not self.targets:
            raise ConfigError("krona needs at least one target, e.g. targets=('q', 'v')")


def kron_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(A (x) B) x`` over the last dimension of ``x`` without forming the Kronecker product."""
    a_out, a_in = a.shape
    b_out, b_in = b.shape
    grid = x.reshape(*x.shape[:-1], a_in, b_in)  # X with vec(X) = x, row-major
    y = torch.matmul(torch.matmul(a, grid), b.t())  # A X B^T: (..., a_out, b_out)
    return y.reshape(*x.shape[:-1], a_out * b_out)


class KronA(DeltaMethod):
    config_class = KronAConfig

    def __init__(self, config: KronAConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: dict[str, Projection] = {}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.gates = nn.ModuleDict()
        for site_key, proj in model_map.projections(config.targets):
            d_out, d_in = proj.out_features, proj.in_features
            if d_out % config.a_out or d_in % config.a_in:
                raise ConfigError(
                    f"krona factors do not fit {proj.path} ({d_in} -> {d_out}): a_out={config.a_out} must divide "
                    f"{d_out} and a_in={config.a_in} must divide {d_in}")
            self.sites[site_key] = proj
            self.A[site_key] = nn.Parameter(torch.zeros(config.a_out, config.a_in))
            b = torch.empty(d_out // config.a_out, d_in // config.a_in)
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.B[site_key] = nn.Parameter(b)
            if config.gate:
                self.gates[site_key] = Gate(d_in)

    def install(self, installer: Installer) -> None:
        for site_key, proj in self.sites.items():
            installer.on_output(proj.module, self._hook(site_key, proj))

    def _hook(self, site_key: str, proj: Projection):
        a, b, scale = self.A[site_key], self.B[site_key], self.config.scale
        gate = self.gates[site_key] if site_key in self.gates else None  # noqa: SIM401 (ModuleDict has no get)

        def add_kron(module, inputs, output):
            x = inputs[0]
            x_in = matmul_input(x, a)
            if not torch.is_autocast_enabled(x.device.type) and x_in.dtype != a.dtype:
                x_in = x_in.to(a.dtype)
            delta = kron_apply(x_in, a, b)
            delta = delta * scale if scale != 1.0 else delta
            if gate is not None:
                delta = delta * gate(x)
            return output + proj.place(cast_like(delta, output))

        return add_kron

    def mergeable(self) -> bool:
        return not self.config.gate

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(torch.kron(self.A[site_key], self.B[site_key]) * self.config.scale)

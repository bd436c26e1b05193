"""KAdaptation (He et al., AAAI 2023): a sum of Kronecker products as the update of W_q and W_v.

``Delta W = sum_{i=1..n} A_i (x) (u_i v_i^T)``: PHM-style, with the n x n rules ``A_i`` shared by
every adapted matrix of the model ("slow" weights) and each matrix's factors ``u_i v_i^T`` of rank
``rank`` ("fast" weights). Built for ViT image classification, it applies to any family. ``v`` starts
at zero (the model starts as the base model), ``u`` and ``A`` random. Mergeable:
``W' = W + scale Delta W``. Parameters: ``n^3`` shared, plus ``rank (d_out + d_in)`` per matrix; the
sizes must divide by ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig, register
from ..runtime import Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input
from .compacter import kron_sum


def low_rank_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u @ v`` for factors (..., p, r) and (..., r, q). At r = 1, the default, the broadcast outer product:
    as a GEMM of inner size 1 it ran on CUTLASS kernels for unaligned rows (BERT-base, H200: 24 a step,
    0.14 ms), where the product and its gradients are elementwise work."""
    return u * v if u.shape[-1] == 1 else u @ v


@register
@dataclass
class KAdaptationConfig(MethodConfig):
    method = "kadaptation"
    description = "KAdaptation: sum of Kronecker products A_i (x) u_i v_i^T on W_q, W_v, shared A_i, mergeable"

    n: int = 4
    rank: int = 1
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("n", "rank")
        if not self.targets:
            raise ConfigError("kadaptation needs at least one target, e.g. targets=('q', 'v')")


class KAdaptation(DeltaMethod):
    config_class = KAdaptationConfig
    serves_rows = True

    def __init__(self, config: KAdaptationConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        n, r = config.n, config.rank
        self.rules = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))
        self.sites: dict[str, Projection] = {}
        self.u = nn.ParameterDict()
        self.v = nn.ParameterDict()
        for site_key, proj in model_map.projections(config.targets):
            d_out, d_in = proj.out_features, proj.in_features
            if d_out % n or d_in % n:
                raise ConfigError(f"kadaptation needs the sizes of {proj.path} ({d_in} -> {d_out}) divisible by n={n}; "
                                  f"choose n among {[k for k in range(1, 9) if d_out % k == 0 and d_in % k == 0]}")
            self.sites[site_key] = proj
            # Var(u v^T) per entry = rank Var(u) Var(v) once v has trained; u like a Linear's fan-in scale
            self.u[site_key] = nn.Parameter(torch.randn(n, d_out // n, r) / math.sqrt(d_in))
            self.v[site_key] = nn.Parameter(torch.zeros(n, r, d_in // n))

    def delta_weight(self, site_key: str) -> torch.Tensor:
        """``sum_i A_i (x) u_i v_i^T`` as (d_out, d_in)."""
        return kron_sum(self.rules, low_rank_product(self.u[site_key], self.v[site_key]))

    def scaled_delta(self, site_key: str) -> torch.Tensor:
        """``scale Delta W``: what merge adds to W, and what the forward adds to it per call."""
        w = self.delta_weight(site_key)
        return w * self.config.scale if self.config.scale != 1.0 else w

    def install(self, installer: Installer) -> None:
        for site_key, proj in self.sites.items():
            # in the projection's own GEMM (see Installer.add_weight_delta): no GEMM of the activations with
            # Delta W in either pass, only its weight gradient
            installer.add_weight_delta(proj, lambda site_key=site_key: self.scaled_delta(site_key),
                                       self._hook(site_key, proj, installer.own_rows))

    def _hook(self, site_key: str, proj: Projection, own_rows):
        def add_update(module, inputs, output):
            w = self.scaled_delta(site_key)  # n d_out d_in / n multiply-adds: small beside the layer's GEMM
            delta = F.linear(matmul_input(inputs[0], w), w)
            return output + proj.place(cast_like(own_rows(delta), output))

        return add_update

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(self.scaled_delta(site_key))

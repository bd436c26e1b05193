"""KAdaptation (He et al., AAAI 2023): a sum of Kronecker products as the update of W_q and W_v.

``Delta W = sum_{i=1..n} A_i (x) (u_i v_i^T)``, ``W' = W + scale Delta W``: PHM-style, with n x n rules
``A_i`` ("slow" weights) shared by every layer, one set per target (one for W_q, one for W_v), each rule of
rank ``rule_rank`` (``A_i = l_i r_i^T``), and each matrix's own "fast" factors ``u_i v_i^T`` of rank ``rank``.
Reference: eric-ai-lab/PEViT@be6fb43, ``vision_benchmark/evaluation/model.py``: ``phm_dim = 32`` rules
(485, 984), ``phm_rank = 1`` fast factors (489), two rule sets ``phm_rule1`` (q) and ``phm_rule2`` (v)
shared by the layers, each factorised at rank 1 and drawn from U(-0.01, 0.01) (491, 985-999), the sum of
Kronecker products (563-580). Built for ViT image classification; it applies to any family.

Init (not the reference's): ``v = 0``, so the model starts as the base model, ``u`` random at a fan-in scale,
the rule factors random with each rule entry of variance 1/n. The released code zeroes both fast factors
(model.py:536-539, its ``w_init = "glorot-uniform"`` branch, 484, with ``factorized_phm``): with
``u = v = 0`` both of their gradients are zero and so is the rules' (it is proportional to ``u v^T``), so
its Kronecker update never leaves zero and only its bias ``b`` and the head train; copying it would not
train. Also not here: the reference's scale 160 (``lora_attn_alpha / lora_attn_dim * 5``, 477-479 and 564;
``scale`` is 1.0 here), its ``Dropout(0.5)`` on Delta W (516, 582), the bias ``b`` it adds to both q and v
(514, 584), and the 1/sqrt(d_head) of CLIP's attention that precedes its q delta (787-798). v's branch there
reads q's fast factors (580), an evident slip; each matrix has its own here. The reference sweeps the
learning rate per dataset (1e-6 to 1e-1, ``kadaptation_clip.py:446-462``): no ``reference_lr``.

``rule_rank = 0`` gives full n x n rules (``n^3`` per set; this library's layout before, with n = 4). Mergeable:
``W' = W + scale Delta W``. Parameters: ``2 n^2 rule_rank`` (or ``n^3``) per target, plus
``rank (d_out + d_in)`` per matrix; at BERT-base (n = 32, ranks 1, W_q and W_v) 4 096 + 24 * 1 536 = 40 960.
The sizes must divide by ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap, Projection
from .base import DeltaMethod, cast_like, matmul_input
from .compacter import kron_sum


def low_rank_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u @ v`` for factors (..., p, r) and (..., r, q). At r = 1, the default, the broadcast outer product:
    as a GEMM of inner size 1 it ran on CUTLASS kernels for unaligned rows (BERT-base, H200: 24 a step,
    0.14 ms), where the product and its gradients are elementwise work."""
    return u * v if u.shape[-1] == 1 else u @ v


@dataclass
class KAdaptationConfig(MethodConfig):
    method = "kadaptation"
    description = ("KAdaptation: sum of 32 Kronecker products A_i (x) u_i v_i^T on W_q, W_v; rules A_i shared by "
                   "the layers, one set per target; mergeable")

    n: int = 32  # Kronecker rules (the reference's phm_dim)
    rank: int = 1  # of each fast factor u_i v_i^T (phm_rank)
    rule_rank: int = 1  # of each rule A_i = l_i r_i^T (factorized_phm_rule); 0: full n x n rules
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "v")  # one rule set per target, shared by its matrices in every layer
    layers: tuple[int, ...] | None = None  # only sites in these layers (index within each stack); None: every one
    exclude: tuple[str, ...] = ()  # sites to leave out: role names, module names or "re:" patterns

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("n", "rank")
        if not isinstance(self.rule_rank, int) or isinstance(self.rule_rank, bool) or self.rule_rank < 0:
            raise ConfigError(f"kadaptation's rule_rank must be an integer >= 0 (0: full rules), got "
                              f"{self.rule_rank!r}")
        if self.rule_rank:
            self.require_positive_ints("rule_rank")  # and not beyond any model's size
        if not self.targets:
            raise ConfigError("kadaptation needs at least one target, e.g. targets=('q', 'v')")


@register_method(KAdaptationConfig)
class KAdaptation(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    serves_rows = True

    def __init__(self, config: KAdaptationConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        n, r, q = config.n, config.rank, config.rule_rank
        # one rule set per target (the reference's phm_rule1 for q, phm_rule2 for v), shared across layers;
        # each rule entry of variance 1/n: full rules N(0, 1/n), factors l, r N(0, 1/sqrt(n q)) each
        self.rules = nn.ParameterDict()  # full rules (rule_rank 0): (n, n, n) per target
        self.rule_left = nn.ParameterDict()  # factorised: l (n, n, q) and r (n, q, n) per target
        self.rule_right = nn.ParameterDict()
        self.sites: dict[str, Projection] = {}
        self.site_rules: dict[str, str] = {}  # site -> the key of its target's rule set
        self.u = nn.ParameterDict()
        self.v = nn.ParameterDict()
        selected = model_map.select(config.targets, config.layers, config.exclude)
        for target in config.targets:
            own = [(site.key, site.projection) for site in selected if site.target == target]
            if not own:  # every site of this target left out by layers/exclude: no rule set for it
                continue
            rules_key = target.replace(".", "__")
            if q == 0:
                self.rules[rules_key] = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))
            else:
                std = (n * q) ** -0.25
                self.rule_left[rules_key] = nn.Parameter(torch.randn(n, n, q) * std)
                self.rule_right[rules_key] = nn.Parameter(torch.randn(n, q, n) * std)
            for site_key, proj in own:
                d_out, d_in = proj.out_features, proj.in_features
                if d_out % n or d_in % n:
                    choices = [k for k in (1, 2, 4, 8, 16, 32, 64) if d_out % k == 0 and d_in % k == 0]
                    raise ConfigError(f"kadaptation needs the sizes of {proj.path} ({d_in} -> {d_out}) divisible "
                                      f"by n={n}; choose n among {choices}")
                if site_key in self.sites:
                    raise ConfigError(f"kadaptation's targets {list(config.targets)} name {proj.path} twice")
                self.sites[site_key] = proj
                self.site_rules[site_key] = rules_key
                # Var(u v^T) per entry = rank Var(u) Var(v) once v has trained; u like a Linear's fan-in scale
                self.u[site_key] = nn.Parameter(torch.randn(n, d_out // n, r) / math.sqrt(d_in))
                self.v[site_key] = nn.Parameter(torch.zeros(n, r, d_in // n))

    def rule_set(self, rules_key: str) -> torch.Tensor:
        """The n rules ``A_i`` of one target, (n, n, n)."""
        if rules_key in self.rules:
            return self.rules[rules_key]
        return low_rank_product(self.rule_left[rules_key], self.rule_right[rules_key])

    def delta_weight(self, site_key: str) -> torch.Tensor:
        """``sum_i A_i (x) u_i v_i^T`` as (d_out, d_in), with the rules of the site's target."""
        rules = self.rule_set(self.site_rules[site_key])
        return kron_sum(rules, low_rank_product(self.u[site_key], self.v[site_key]))

    def scaled_delta(self, site_key: str) -> torch.Tensor:
        """``scale Delta W``: what merge adds to W, and what the forward adds to it per call."""
        w = self.delta_weight(site_key)
        return w * self.config.scale if self.config.scale != 1.0 else w

    def _hook(self, site_key: str, proj: Projection, own_rows):
        def add_update(module, inputs, output):
            w = self.scaled_delta(site_key)  # n d_out d_in / n multiply-adds: small beside the layer's GEMM
            delta = F.linear(matmul_input(inputs[0], w), w)
            return output + proj.place(cast_like(own_rows(delta), output))

        return add_update

    def install(self, installer: Installer) -> None:
        for site_key, proj in self.sites.items():
            # speed path, in the projection's own GEMM (Installer.add_weight_delta): no GEMM of the activations with
            # Delta W in either pass, only its weight gradient
            installer.add_weight_delta(proj, lambda site_key=site_key: self.scaled_delta(site_key),
                                       self._hook(site_key, proj, installer.own_rows))

    def mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge(self) -> None:
        for site_key, proj in self.sites.items():
            proj.add_to_weight(self.scaled_delta(site_key))

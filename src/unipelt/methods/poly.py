"""Polytropon, Poly-S and Poly-mu (Ponti et al. 2023; Caccia et al. 2023): ``h = W x + (1 / r) B_t A_t x``, with
``A_t = sum_k w_tk A_k``, ``B_t = sum_k w_tk B_k`` mixed from an inventory of LoRA skills by task ``t``'s routing.

Reference: microsoft/mttl ``mttl/models/poly.py`` (``PolytroponSelector``, ``PolyLoRALinear``) with its defaults
in ``mttl/config.py`` and ``configs/t0/poly_lora.json``, and McGill-NLP/polytropon ``src/polytropon/adapters.py``:
``skills = 8`` LoRA modules ``(A_k, B_k)`` of rank ``r = 16`` at every adapted projection (W_q, W_k, W_v, W_o of
every attention), scaled by ``alpha / r`` with ``alpha = 1`` (the reference's ``1 / r``); ``A_k`` uniform in
``+-1 / sqrt(3 d_in)``, ``B_k = 0`` (the model starts as the base model). Every adapted projection has its own
routing matrix ``Z`` of logits, ``tasks x heads x skills`` (mttl's ``finegrained`` granularity), starting
uniform in ``+-1e-3``; a row of task ``t`` uses there

    w_t = s(Z_t) / sum_k s(Z_tk)

with ``s`` the sigmoid, or while training a relaxed Bernoulli sample of it (Gumbel-sigmoid at ``temperature``
1), as Polytropon learns its binary skill allocation. The routing logits train at their own learning rate,
0.1 (mttl's ``module_logits_learning_rate``; ``rate_groups``, ``--part-lr poly.routing=LR``), the inventory at
the run's (``reference_lr`` 1e-3, mttl's ``learning_rate``): at the inventory's rate the logits barely move
and learned routing stays close to Poly-mu. Rows choose their task through ``task_ids`` in the model call
(one id per row); with one task it may be left out. A call without ``task_ids`` (every row the default
task) mixes ``A_t`` and ``B_t`` once and runs as a rank-r LoRA.

- ``poly``: one head (Polytropon).
- ``poly_s``: ``heads`` > 1, multi-head routing (Caccia et al.'s Poly-S/MHR, mttl's ``n_splits``): A's input
  columns and B's output rows are split into ``heads`` blocks, each routed on its own.
- ``poly_mu``: the routing is fixed to the uniform average of the inventory (Poly-mu): every task uses
  the mean module, and adapting to a new task fine-tunes the inventory itself.

Few-shot adaptation to a new task: ``Poly.add_task()`` appends a routing row (near-uniform logits, as mttl's
``resize_module_logits``) and returns its id, which calls without ``task_ids`` then use; train the routing
alone (``Poly.train_routing_only()``) or everything (``unipelt train --from-inventory DIR [--routing-only]``).
Not mergeable (rows of different tasks need different weights). Parameters: ``skills r (d_in + d_out) + tasks
heads skills`` per adapted matrix (no routing for ``poly_mu``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import ConfigError, MethodConfig
from ..registry import Preset, register_method
from ..runtime import Installer, shared_by_input, stacked_linear
from ..sites import ModelMap, Projection
from .base import DeltaMethod, add_up_projection, attention_input_groups, cast_like, matmul_input

ROUTINGS = ("learned", "uniform")
ROUTING_LR = 0.1  # mttl's module_logits_learning_rate
ROUTING_INIT = 1e-3  # logits uniform in +-ROUTING_INIT (mttl's PolytroponSelector)


def _routing_logits(tasks: int, heads: int, skills: int) -> torch.Tensor:
    return torch.empty(tasks, heads, skills).uniform_(-ROUTING_INIT, ROUTING_INIT)


@dataclass
class PolyConfig(MethodConfig):
    method = "poly"
    description = "Polytropon: an inventory of LoRA skills per projection, routed per task (task_ids per row)"

    # mttl's defaults: learning_rate (the inventory's) 1e-3; the routing logits at ROUTING_LR (rate_groups)
    reference_lr: ClassVar[float | None] = 1e-3

    tasks: int = 1
    skills: int = 8
    r: int = 16
    alpha: float = 1.0  # scaling alpha / r = 1 / r, the reference's
    heads: int = 1
    routing: str = "learned"
    temperature: float = 1.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    layers: tuple[int, ...] | None = None  # only sites in these layers (index within each stack); None: every one
    exclude: tuple[str, ...] = ()  # sites to leave out: role names, module names or "re:" patterns
    default_task: int | None = None  # the task of calls without task_ids (set by add_task)

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("tasks", "skills", "r", "heads")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"poly routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not self.temperature > 0:
            raise ConfigError(f"poly temperature must be positive, got {self.temperature!r}")
        if not self.targets:
            raise ConfigError("poly needs at least one target, e.g. targets=('q', 'v')")
        if self.default_task is not None and not 0 <= self.default_task < self.tasks:
            raise ConfigError(f"poly default_task {self.default_task} is not one of the {self.tasks} tasks")


@register_method(PolyConfig, presets={
    "poly_s": Preset("Poly-S: multi-head routing of the LoRA inventory (4 heads)", heads=4),
    "poly_mu": Preset("Poly-mu: every task uses the inventory's uniform average", routing="uniform"),
})
class Poly(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection
    uses_task_ids = True  # reads the model call's task_ids (one per row)

    def __init__(self, config: PolyConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        k, r, heads = config.skills, config.r, config.heads
        self.sites: dict[str, Projection] = {}
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.routing = nn.ParameterDict()  # one routing matrix per adapted projection, keyed as its site
        for site_key, proj in model_map.projections(config.targets, config.layers, config.exclude):
            d_in, d_out = proj.in_features, proj.out_features
            if d_in % heads or d_out % heads:
                raise ConfigError(f"poly heads={heads} must divide the sizes of {proj.path} ({d_in} -> {d_out})")
            self.sites[site_key] = proj
            # the reference's A init: uniform with bound gain / sqrt(d_in), gain of leaky ReLU at sqrt(5) = 1 / sqrt(3)
            bound = 1.0 / math.sqrt(3 * d_in)
            self.A[site_key] = nn.Parameter(torch.empty(k, r, d_in).uniform_(-bound, bound))
            self.B[site_key] = nn.Parameter(torch.zeros(k, d_out, r))
            if config.routing == "learned":
                self.routing[site_key] = nn.Parameter(_routing_logits(config.tasks, heads, k))

    @property
    def tasks(self) -> int:
        return self.config.tasks

    def add_task(self) -> int:
        """A new task's routing row (uniform: every skill equally likely); its task id, which calls without
        ``task_ids`` now use."""
        if self.config.routing == "learned":
            for site_key, z in self.routing.items():
                row = _routing_logits(1, *z.shape[1:]).to(z)
                self.routing[site_key] = nn.Parameter(torch.cat([z.detach(), row]), requires_grad=z.requires_grad)
        new = self.config.tasks
        self.config = replace(self.config, tasks=new + 1, default_task=new)
        return new

    def rate_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """The routing logits train at the reference's own rate, 0.1 (``--part-lr poly.routing=LR``)."""
        return {"routing": (list(self.routing.values()), ROUTING_LR)}

    def train_routing_only(self) -> None:
        """Freeze the inventory; only the routing trains (Poly-z adaptation to a new task)."""
        for p in [*self.A.values(), *self.B.values()]:
            p.requires_grad_(False)

    def weights(self, site_key: str, task_ids: torch.Tensor) -> torch.Tensor:
        """Each row's skill weights at the projection ``site_key``: (batch, heads, skills), summing to 1 over
        skills."""
        return self._task_weights(site_key, task_ids.device)[task_ids]

    def _task_weights(self, site_key: str, device: torch.device) -> torch.Tensor:
        """Every task's skill weights at ``site_key``: (tasks, heads, skills); sampled while training."""
        k, heads = self.config.skills, self.config.heads
        if self.config.routing == "uniform":
            return torch.full((self.config.tasks, heads, k), 1.0 / k, device=device)
        z = self.routing[site_key]
        if self.training:  # relaxed Bernoulli: sigmoid((Z + logistic noise) / temperature)
            u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
            w = torch.sigmoid((z + torch.log(u) - torch.log1p(-u)) / self.config.temperature)
        else:
            w = torch.sigmoid(z)
        return w / (w.sum(-1, keepdim=True) + 1e-12)

    def routed_pair(self, site_key: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_t, B_t)`` of one task at a site from its skill weights ``w`` (heads, skills): per head block,
        ``A_t = sum_k w_k A_k`` (A's input columns) and ``B_t = sum_k w_k B_k`` (B's output rows)."""
        a, b = self.A[site_key], self.B[site_key]
        k, r, d_in = a.shape
        d_out, heads = b.shape[1], self.config.heads
        w = w.to(a.dtype).t()  # (skills, heads)
        a_t = (w.view(k, 1, heads, 1) * a.view(k, r, heads, d_in // heads)).sum(0).view(r, d_in)
        b_t = (w.view(k, heads, 1, 1) * b.view(k, heads, d_out // heads, r)).sum(0).view(d_out, r)
        return a_t, b_t

    def _hook(self, site_key: str, proj: Projection, context, task_ids_of, one_task):
        """The output hook ``h <- W x + (alpha / r) B_t A_t x``, ``t`` each row's task (the call's ``task_ids``); a
        call without them reads ``one_task`` (the speed path below)."""
        scaling, heads = self.config.alpha / self.config.r, self.config.heads

        def add_routed(module, inputs, output):
            a, b = self.A[site_key], self.B[site_key]  # read per call (FSDP swaps parameters each forward)
            x = inputs[0]
            if context.task_ids is None:
                h, b_t = one_task(site_key, x)
                return add_up_projection(output, h, b_t, scaling, proj)
            w = self.weights(site_key, task_ids_of(x)).to(a.dtype)  # (batch, heads, skills)
            k, r, d_in = a.shape
            d_out = b.shape[1]
            # Rows of different tasks: not each row's A_t and B_t formed first (per-row GEMMs of width r, on
            # kernels for unaligned rows where r is small): every skill's A_k x in one GEMM of k r columns, per
            # head block, then h = sum_k w_k A_k x and B_t h = [w_1 h; ...; w_k h] [B_1 ... B_k]^T, the same sums.
            lead = x.shape[:-1]
            row_w = w.view(w.shape[0], *([1] * (len(lead) - 1)), heads, k, 1)  # broadcasts over the row's tokens
            x_heads = matmul_input(x, a).view(*lead, heads, d_in // heads)
            per_skill = torch.einsum("...jd,krjd->...jkr", x_heads, a.view(k, r, heads, d_in // heads))
            h = (per_skill * row_w).sum((-3, -2), keepdim=True)  # (..., 1, 1, r)
            delta = torch.einsum("...jkr,kjor->...jo", h * row_w, b.view(k, heads, d_out // heads, r))
            delta = delta.reshape(*lead, d_out) * scaling
            return output + proj.place(cast_like(delta, output))

        return add_routed

    def install(self, installer: Installer) -> None:
        context = installer.context

        def default_task() -> int:
            if self.config.default_task is not None:
                return self.config.default_task
            if self.config.tasks == 1:
                return 0
            raise ConfigError(f"poly routes {self.config.tasks} tasks: pass task_ids= (one task id per row, "
                              f"0..{self.config.tasks - 1}) in the model call")

        def task_ids_of(x: torch.Tensor) -> torch.Tensor:
            ids = context.task_ids
            if ids.shape[0] != x.shape[0] or int(ids.max()) >= self.config.tasks or int(ids.min()) < 0:
                raise ConfigError(f"task_ids {ids.tolist()} do not fit a batch of {x.shape[0]} rows and "
                                  f"{self.config.tasks} poly tasks")
            return ids.to(x.device)

        for group in attention_input_groups(self.sites):
            one_task = self._one_task_reader(group, context.values, default_task)
            for site_key in group:
                installer.on_output(self.sites[site_key].module,
                                    self._hook(site_key, self.sites[site_key], context, task_ids_of, one_task))

    def saved_config(self) -> PolyConfig:
        return self.config  # holds the current task count (add_task grows it)

    # --- speed path: a call whose rows all belong to one task mixes that task's ``A_t``, ``B_t`` once and runs as a
    # rank-r LoRA, the group's ``A_t x`` as one GEMM (:func:`~unipelt.runtime.stacked_linear`): the same delta as
    # ``_hook``'s per-row sums above, with every row's weights equal.
    def _one_task_reader(self, group: list[str], cache: dict, default_task):
        """``read(site_key, x) -> (A_t x, B_t)`` for a call whose rows all belong to one task (no task_ids).

        Every row shares ``A_t`` and ``B_t``, so they are mixed first (a few small tensors) and the site is
        a plain rank-r LoRA: one GEMM for the group's ``x [A_t1; A_t2; ...]^T`` and one for
        ``output + s B_t h``, where the rows' own mixing would cost elementwise work and reductions over every
        token (k r columns per site). The rank is padded with zeros to a multiple of 8: at r = 2 the GEMMs
        with an inner or outer size of 2 ran on kernels for unaligned rows (H200: 0.43 ms of a BERT-base step).
        """
        column = {k: i for i, k in enumerate(group)}
        r = self.config.r
        padded = -r % 8

        def compute(x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
            task = default_task()
            a_ts, b_ts = [], []
            for site_key in group:
                a_t, b_t = self.routed_pair(site_key, self._task_weights(site_key, x.device)[task])
                if padded:
                    a_t = torch.cat([a_t, a_t.new_zeros(padded, a_t.shape[1])])
                    b_t = torch.cat([b_t, b_t.new_zeros(b_t.shape[0], padded)], 1)
                a_ts.append(a_t)
                b_ts.append(b_t)
            return stacked_linear(x, a_ts, None, [r + padded] * len(group)), b_ts

        shared = shared_by_input(cache, (id(self), group[0]), len(group), compute)

        def read(site_key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hs, bs = shared(x)
            return hs[column[site_key]], bs[column[site_key]]

        return read

"""Rational activations, RAFT (Fang et al. 2022): ``R(x) = P(x) / Q(x)`` replaces every FFN activation and the
[CLS] pooler's activation (BERT's tanh), with the "version A" safe Pade unit

    R(x) = (a_0 + a_1 x + ... + a_m x^m) / (1 + |b_1| |x| + |b_2| |x|^2 + ... + |b_n| |x|^n),

with ``m = 5`` and ``n = 4`` by default (``numerator_degree``, ``denominator_degree``). Q >= 1, so the unit
has no poles. Its trainable parameters are ``numerator`` (a_0..a_m) and ``denominator`` (b_1..b_n), float32.

Reference: UKPLab/2022-RAFT ``transformers_modified/modeling.py`` and ``transformers_modified/models/bert/
modeling_bert.py`` (``Rational(approx_func, version="A")`` at ``rational_layers="0-11,pooler"``) and ``run_glue.py``
(coefficients in their own optimizer group at ``rational_lr``), with the unit of ml-research/rational_activations
``rational/torch/rational_pytorch_functions.py`` (``Rational_PYTORCH_A_F``; version A is that library's default).

The setting. RAFT's results come from a BERT *pretrained with* rational units (initialised at the library's
GELU fit, then trained on MLM with the rest of the model); fine-tuning then trains the units' coefficients
and the classifier only (``--ch_rf``). Swapping units fitted to GELU into a GELU-pretrained model, which is
what this method does by default, is not that experiment: it starts from an approximation of the
pretrained model (off by the fit error, see below) and trains a few coefficients per layer that the body
never learned to work with. To run RAFT's own setting, load such a checkpoint's coefficients into the
units: ``coefficients="path/to/raft-checkpoint"`` (read at attach; the units then start exactly there and
run without tails, as the reference's do), or :func:`load_coefficients` on an attached model.

The fit. Without a checkpoint, each unit starts at a fit of the activation it replaces (GELU, ReLU or SiLU
in the FFN, named by ``init`` or found by running the model's own activation on a probe grid; tanh at the
pooler), so the model changes at init only by the fit error. :func:`fit_rational` (once per activation
and degrees, cached in-process) runs in float64 on ``[-5, 5]``: a linear least-squares start, then
Levenberg-Marquardt steps on ``R - f``, then Lawson's reweighting towards a smaller maximum error. Maximum
errors on ``[-5, 5]`` with m = 5, n = 4: GELU 2.7e-3, SiLU 2.6e-5, ReLU 2.4e-2 (ReLU's kink), tanh 1.0e-4.
The former "version B" denominator ``1 + |b_1 x + ... + b_n x^n|`` fitted no better (GELU 2.4e-3, SiLU
2.6e-5, ReLU 2.2e-2), so it is gone. The reference library's own GELU coefficients were fitted on
``[-3, 3]`` (4.2e-3 there, 0.22 on ``[-5, 5]``).

Tails. With fitted coefficients the unit continues, beyond the fit range, as straight lines along the
activation's asymptotes: pretrained FFNs reach far outside it (all-MiniLM-L6-v2: -17 to 24), where a
rational grows like ``c x`` (see :class:`RationalUnit`, :func:`tail_slopes`). The reference has no tails;
``tails`` (None: on for fitted units, off for coefficients loaded from a checkpoint) decides.

Learning rates. The reference's low-data GLUE runs (100 examples; ``scripts/finetune/bitfit/
glue-raft-lr-array.sh``) train the classifier at 5e-3 (``reference_lr``) and the coefficients at 1e-3 in
their own group (``rate_groups``: ``rational.coefficients``; ``--part-lr rational.coefficients=LR``), both
with weight decay 0.1; its full-data runs use 1e-2 and 5e-4.

The unit computes in float32 (float64 for a float64 model) whatever the input's dtype, autocast included,
and returns the input's dtype. Its backward recomputes P and Q from the saved input, so training keeps
one tensor per call, as the activation it replaces did. ``shared=True`` uses one unit for every FFN
(the pooler keeps its own). Parameters: ``(L + 1)(m + 1 + n)`` for L layers (all stacks of an
encoder-decoder) and a pooler, ``L (m + 1 + n)`` without one; ``2 (m + 1 + n)`` shared. Not mergeable: no
base weight can hold a rational function, so ``merge`` keeps the units.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..registry import register_method
from ..runtime import Installer
from ..sites import ModelMap
from .base import DeltaMethod

INITS = ("gelu", "relu", "silu")  # the FFN activations a unit can start from
POOLER_INITS = ("tanh", "gelu", "relu", "silu")  # and the pooler's (BERT: tanh)
FIT_RANGE = (-5.0, 5.0)
FIT_POINTS = 2001
COEFFICIENT_LR = 1e-3  # the reference's rational_lr for low-data GLUE (glue-raft-lr-array.sh)
POOLER = "pooler"  # the pooler unit's key
_PROBE_TOLERANCE = 1e-3  # tanh approximations of GELU are within 4.8e-4 of the exact one; QuickGELU is 2e-2 off
_CONFIG_KEYS = ("hidden_act", "activation_function", "activation", "dense_act_fn", "hidden_activation")
_CONFIG_NAMES = {
    "gelu": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_python": "gelu",
    "gelu_python_tanh": "gelu", "gelu_accurate": "gelu", "gelu_10": "gelu",
    "relu": "relu", "silu": "silu", "swish": "silu",
}
_CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin", "delta.safetensors")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": _gelu, "relu": _relu, "silu": _silu,
                                                               "tanh": torch.tanh}


@dataclass
class RationalConfig(MethodConfig):
    method = "rational"
    description = ("RAFT: the FFN (and pooler) activations become trainable rational units "
                   "P(x) / (1 + sum |b_k| |x|^k)")
    reference_lr: ClassVar[float | None] = 5e-3  # the classifier's; the coefficients train at COEFFICIENT_LR

    numerator_degree: int = 5
    denominator_degree: int = 4
    init: str | None = None  # the FFN activation to fit; None: the model's own, detected per layer
    shared: bool = False  # one unit for every FFN layer instead of one per layer
    pooler: bool = True  # a unit at the [CLS] pooler's activation too, where the model has one (BERT)
    coefficients: str | None = None  # a checkpoint (file or folder) whose rational coefficients the units take
    tails: bool | None = None  # straight tails beyond [-5, 5]; None: on for fitted units, off for loaded ones

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("numerator_degree", "denominator_degree")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"rational init must be one of {list(INITS)} or None (detect the model's own), "
                              f"got {self.init!r}")
        for name in ("shared", "pooler"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"rational {name} must be true or false, got {getattr(self, name)!r}")
        if self.tails is not None and not isinstance(self.tails, bool):
            raise ConfigError(f"rational tails must be true, false or None, got {self.tails!r}")
        if self.coefficients is not None and not isinstance(self.coefficients, str):
            raise ConfigError(f"rational coefficients must be the path of a checkpoint (a string), "
                              f"got {self.coefficients!r}")


# ------------------------------------------------------------------------------------- evaluation


def _horner(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``sum_j c_j x^j`` by Horner's rule, one fused multiply-add per degree."""
    c = coefficients
    if c.shape[0] == 1:
        return c[0].expand(x.shape)
    acc = torch.addcmul(c[-2], x, c[-1])
    for j in range(c.shape[0] - 3, -1, -1):
        acc = torch.addcmul(c[j], acc, x)
    return acc


def _compute_dtype(x: torch.Tensor, coefficients: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, coefficients.dtype), torch.float32)


def _clamped(xc: torch.Tensor, tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    # by ``where``, not ``clamp``: clamp's gradient is 0 on the bounds themselves (bfloat16 holds +-5
    # exactly), where the unit's slope is the rational's
    return xc if tails is None else torch.where(xc > tails[1], tails[1], torch.where(xc < tails[0], tails[0], xc))


def _evaluate(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
              tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    """The unit's value (see :func:`rational`), as plain differentiable tensor operations."""
    dtype = _compute_dtype(x, numerator)
    xc = x.to(dtype)
    inner = _clamped(xc, tails)
    u = inner.abs()
    p = _horner(inner, numerator.to(dtype))
    s = _horner(u, denominator.to(dtype).abs()) * u  # sum_k |b_k| |x|^k
    out = p / (1 + s)
    if tails is not None:
        out = out + (xc - inner) * torch.where(xc > tails[1], tails[3], tails[2])
    return out.to(x.dtype)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
             tails: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """The version-A safe Pade unit ``(sum_j a_j x^j) / (1 + sum_k |b_k| |x|^k)`` elementwise, on any shape.

    ``numerator`` holds ``a_0 .. a_m``, ``denominator`` holds ``b_1 .. b_n``. With ``tails = (lo, hi,
    slope_lo, slope_hi)`` the unit is that rational on ``[lo, hi]`` and continues as straight lines of
    those slopes outside. Computed in float32 (or float64 when the input or coefficients are),
    returned in the input's dtype. The value is :func:`_evaluate`'s; the backward is hand-written (``_Rational``,
    the speed path at the end of this module).
    """
    return _Rational.apply(x, numerator, denominator, tails)


def tail_slopes(fn: Callable[[torch.Tensor], torch.Tensor], lo: float = FIT_RANGE[0],
                hi: float = FIT_RANGE[1]) -> tuple[float, float, float, float]:
    """``(lo, hi, slope left, slope right)``: where a unit fitted to ``fn`` hands over to straight lines, and
    their slopes: the activation's far out (its asymptotes: 0 and 1 for GELU, ReLU and SiLU). Not the fit's
    slopes at the ends, which are off by its oscillating error (0.08 for ReLU), nor ``fn``'s there (SiLU
    still bends at -5, so its slope there would drift by 0.9 at -40). The tails are then within
    ``|fn(+-5) - asymptote|`` of ``fn`` plus the fit error: 2e-3 for GELU, 2e-2 for ReLU, 3.4e-2 for SiLU."""
    x = torch.tensor([8 * lo, 8 * hi], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(fn(x).sum(), x)
    return lo, hi, float(slope[0]), float(slope[1])


class RationalUnit(nn.Module):
    """A trainable rational activation: ``numerator`` (m + 1) and ``denominator`` (n) coefficients.

    A type (m, m - 1) rational grows like ``c x`` towards both infinities, while GELU, ReLU and SiLU are
    flat on the left and the identity on the right; pretrained FFNs do reach far beyond the fit range
    (all-MiniLM-L6-v2: -17 to 24 on three sentences), where the bare rational was off by several units
    and changed the model's output by two thirds. So the unit continues, outside the fit range, as
    straight lines along the fitted activation's asymptotes (``tails``, see :func:`tail_slopes`; fixed, so
    a loaded unit gets the same); inside, it is the rational, trained as usual. ``tails=None`` keeps the
    rational everywhere.
    """

    def __init__(self, numerator: torch.Tensor, denominator: torch.Tensor,
                 tails: tuple[float, float, float, float] | None = None):
        super().__init__()
        self.numerator = nn.Parameter(numerator.detach().to(torch.float32).clone())
        self.denominator = nn.Parameter(denominator.detach().to(torch.float32).clone())
        self.tails = tails

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator, self.tails)

    def extra_repr(self) -> str:
        return f"numerator_degree={self.numerator.shape[0] - 1}, denominator_degree={self.denominator.shape[0]}"


# ------------------------------------------------------------------------------------------ the fit


def _levenberg_marquardt(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, m: int,
                         iterations: int) -> torch.Tensor:
    """Minimise ``sum w (R(x) - y)^2`` over the coefficients, from ``c``, in float64."""
    vp = torch.stack([x ** j for j in range(m + 1)], 1)
    vq = torch.stack([x.abs() ** k for k in range(1, c.shape[0] - m)], 1)
    sw = weights.sqrt()

    def residual(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = 1 + vq @ c[m + 1:].abs()
        return (vp @ c[:m + 1]) / q - y, q

    r, q = residual(c)
    cost = float(((sw * r) ** 2).sum())
    damping = 1e-3
    for _ in range(iterations):
        # dR/da_j = x^j / Q, dR/db_k = -R sign(b_k) |x|^k / Q
        jac = torch.cat([vp / q[:, None], (-(r + y) / q)[:, None] * vq * torch.sign(c[m + 1:])], 1) * sw[:, None]
        scale = (jac ** 2).sum(0).clamp_min(1e-30).sqrt()
        improved = False
        while damping < 1e12:
            system = torch.cat([jac, torch.diag(math.sqrt(damping) * scale)], 0)
            target = torch.cat([-sw * r, torch.zeros_like(c)])
            step = torch.linalg.lstsq(system, target[:, None], driver="gelsd").solution[:, 0]
            trial = c + step
            r_new, q_new = residual(trial)
            new_cost = float(((sw * r_new) ** 2).sum())
            if math.isfinite(new_cost) and new_cost < cost:
                improved = cost - new_cost > 1e-12 * cost
                c, r, q, cost = trial, r_new, q_new, new_cost
                damping = max(damping / 3, 1e-12)
                break
            damping *= 4
        if not improved:
            break
    return c


def fit_rational(fn: Callable[[torch.Tensor], torch.Tensor], m: int = 5, n: int = 4, lo: float = FIT_RANGE[0],
                 hi: float = FIT_RANGE[1], points: int = FIT_POINTS,
                 lawson_rounds: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the version-A unit of degrees (m, n) that fit ``fn`` on ``[lo, hi]``, in float64.

    Returns ``(numerator a_0..a_m, denominator b_1..b_n)``. A linear least-squares start (``P - fn Q``
    with the denominator's signs left free), then Levenberg-Marquardt on ``R - fn``, then ``lawson_rounds`` rounds of
    Lawson's reweighting towards the smallest maximum error; the coefficients with the smallest
    maximum error on the grid are returned. Deterministic; CPU only.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny LAPACK calls: extra threads only add overhead (25x when busy)
    try:
        return _fit(fn, m, n, lo, hi, points, lawson_rounds)
    finally:
        torch.set_num_threads(threads)


def _fit(fn: Callable[[torch.Tensor], torch.Tensor], m: int, n: int, lo: float, hi: float, points: int,
         lawson_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    y = fn(x).to(torch.float64)
    vp = torch.stack([x ** j for j in range(m + 1)], 1)
    vq = torch.stack([x.abs() ** k for k in range(1, n + 1)], 1)
    start = torch.linalg.lstsq(torch.cat([vp, -y[:, None] * vq], 1), y[:, None], driver="gelsd").solution[:, 0]
    weights = torch.full_like(x, 1.0 / points)
    c = _levenberg_marquardt(start, x, y, weights, m, iterations=100)

    def max_error(c: torch.Tensor) -> tuple[float, torch.Tensor]:
        r = (vp @ c[:m + 1]) / (1 + vq @ c[m + 1:].abs()) - y
        return float(r.abs().max()), r

    best, r = max_error(c)
    best_c = c
    for _ in range(lawson_rounds):
        weights = weights * (r.abs() + 1e-15)
        weights = weights / weights.sum()
        c = _levenberg_marquardt(c, x, y, weights, m, iterations=8)
        error, r = max_error(c)
        if not math.isfinite(error):
            break
        if error < best:
            best, best_c = error, c
    if not math.isfinite(best):
        raise RuntimeError(f"the rational fit of degrees ({m}, {n}) did not converge")
    return best_c[:m + 1].clone(), best_c[m + 1:].clone()


@functools.cache
def _cached_fit(name: str, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fit_rational(TARGETS[name], m, n)


def initial_coefficients(name: str, m: int = 5, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit of activation ``name`` ("gelu", "relu", "silu", "tanh"), computed once per process and degrees."""
    if name not in TARGETS:
        raise ConfigError(f"no rational fit for activation {name!r}; choose one of {list(TARGETS)}")
    numerator, denominator = _cached_fit(name, m, n)
    return numerator.clone(), denominator.clone()


# -------------------------------------------------------------------- finding the model's activation


class _UnitSlot(nn.Module):
    """Stands where a model's activation module was and runs a unit that the method owns.

    The unit is kept out of this module's children, so its coefficients are registered once, under
    the method, and the model's own state dict keeps only the base weights.
    """

    def __init__(self, unit: RationalUnit):
        super().__init__()
        object.__setattr__(self, "unit", unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x)

    def extra_repr(self) -> str:
        return f"rational unit ({self.unit.extra_repr()})"


class _UnitCall:
    """Stands where a model keeps its activation as a plain function attribute."""

    def __init__(self, unit: RationalUnit):
        self.unit = unit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x)

    def __repr__(self) -> str:
        return f"rational unit ({self.unit.extra_repr()})"


def _describe(act: object) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    return getattr(act, "__qualname__", None) or getattr(act, "__name__", None) or type(act).__name__


def _config_activation(model: nn.Module) -> tuple[str, str] | None:
    """``(key, value)`` of the activation named in the model's config, if any."""
    config = getattr(model, "config", None)
    for key in _CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, str):
            return key, value
    return None


@torch.no_grad()
def _probe(act: Callable, device: torch.device, names: tuple[str, ...] = INITS) -> str | None:
    """Which of ``names`` (GELU, ReLU, SiLU) ``act`` computes on the fit range (None: none of them)."""
    x = torch.linspace(*FIT_RANGE, 1001, dtype=torch.float32)
    y = act(x.to(device).clone()).to("cpu", torch.float32)
    errors = {name: float((y - TARGETS[name](x)).abs().max()) for name in names}
    name = min(errors, key=errors.get)
    return name if errors[name] <= _PROBE_TOLERANCE else None


def detect_activation(act: object, model: nn.Module, device: torch.device, where: str = "") -> str:
    """The name ("gelu", "relu", "silu") of the activation ``act`` computes; a ConfigError otherwise.

    ``act`` is run on a grid over [-5, 5] and compared with each candidate (tanh approximations of
    GELU count as GELU). Where it cannot run there, the model config's activation name decides.
    """
    named = _config_activation(model)
    try:
        found = _probe(act, device) if device.type != "meta" else None
        probed = device.type != "meta"
    except Exception:  # an activation that cannot run on a float32 probe: fall back on the config
        found, probed = None, False
    if found is None and not probed and named is not None:
        found = _CONFIG_NAMES.get(named[1])
    if found is not None:
        return found
    config_note = f", config {named[0]}={named[1]!r}" if named is not None else ""
    raise ConfigError(
        f"rational: the FFN activation{where} ({_describe(act)}{config_note}) is not GELU, ReLU or SiLU, "
        f"so there is no fit to start from; pass init=\"gelu\", init=\"relu\" or init=\"silu\" to start the "
        f"rational unit from one of them"
    )


def _pooler_activation(act: object, device: torch.device) -> str:
    """The name of the pooler's activation (BERT's: "tanh"), found by probing; a ConfigError otherwise."""
    try:
        found = _probe(act, device, POOLER_INITS) if device.type != "meta" else None
    except Exception:
        found = None
    if found is None:
        raise ConfigError(f"rational: the pooler's activation ({_describe(act)}) is not one of {list(POOLER_INITS)}, "
                          f"so there is no fit to start its unit from; pass pooler=False to leave it as it is")
    return found


def _pooler_site(model: nn.Module) -> tuple[nn.Module, str] | None:
    """``(pooler, "activation")`` where the base model has a [CLS] pooler with an activation attribute (BERT's
    ``BertPooler``); None for models without one (a mean pooler, ``add_pooling_layer=False``, other families)."""
    body = getattr(model, "base_model", model)
    pooler = getattr(body, "pooler", None)
    if not isinstance(pooler, nn.Module) or "activation" not in {**pooler._modules, **pooler.__dict__}:
        return None
    return pooler, "activation"


# ---------------------------------------------------------------------------- pretrained coefficients


def read_coefficients(source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every rational unit's coefficients in ``source``: ``{prefix: (numerator, denominator)}``.

    ``source`` is a state dict (or a module, whose state dict is read), a checkpoint file (``.safetensors``,
    else ``torch.load``), or a folder holding ``model.safetensors``, ``pytorch_model.bin`` or a unipelt
    ``delta.safetensors``. A unit is a pair of entries ``<prefix>.numerator`` and ``<prefix>.denominator``, as
    rational_activations' ``Rational`` modules store them in a RAFT checkpoint
    (``bert.encoder.layer.3.intermediate.intermediate_act_fn.numerator``, ``bert.pooler.activation.numerator``)
    and as this method saves them (``rational.units.layers3.numerator``).
    """
    if isinstance(source, nn.Module):
        state: Mapping[str, torch.Tensor] = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        state = _read_checkpoint(Path(source))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("numerator", "denominator") and isinstance(value, torch.Tensor):
            pairs.setdefault(prefix, {})[leaf] = value
    broken = sorted(prefix for prefix, pair in pairs.items() if len(pair) != 2)
    if broken:
        raise ConfigError(f"rational coefficients: {broken} have a numerator or a denominator but not both")
    return {prefix: (pair["numerator"].detach(), pair["denominator"].detach()) for prefix, pair in pairs.items()}


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    if path.is_dir():
        found = [path / name for name in _CHECKPOINT_FILES if (path / name).exists()]
        if not found:
            raise ConfigError(f"rational coefficients: {path} holds none of {list(_CHECKPOINT_FILES)}")
        path = found[0]
    if not path.exists():
        raise ConfigError(f"rational coefficients: no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConfigError(f"rational coefficients: {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_coefficients(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
                      ) -> list[str]:
    """Copy pretrained rational coefficients from ``source`` into the units of the rational method attached to
    ``model``; returns the units' keys (``layers0``, ..., ``pooler``).

    This is how RAFT's own setting runs here: its checkpoints hold units pretrained with the model (see the
    module docstring); a GELU fit swapped into a GELU-pretrained model only approximates that model at init.
    ``source`` is read by :func:`read_coefficients`. A set goes to the unit whose layer's path (``encoder.layer.3``)
    or key (``layers3``, ``pooler``) its prefix names. Every unit must get exactly one set of its degrees, and
    every set must find a unit, or nothing is copied and a ConfigError says why. The units keep their tails as
    configured: attach with ``tails=False`` to run the reference's units (or pass ``coefficients=`` to the
    config, which turns them off unless told otherwise).
    """
    from .. import core

    found = [m for m in core.deltas(model).values() if isinstance(m, Rational)]
    if len(found) != 1:
        raise ConfigError(f"load_coefficients needs one attached rational method, the model has {len(found)}")
    return found[0].load_coefficients(read_coefficients(source))


# ------------------------------------------------------------------------------------------ the method


def _module_paths(model: nn.Module) -> dict[int, str]:
    body = getattr(model, "base_model", model)
    return {id(module): path for path, module in body.named_modules() if path}


@register_method(RationalConfig)
class Rational(DeltaMethod):
    quantized_base = True  # runs on bitsandbytes 4-/8-bit layers: reads and writes W through Projection

    def __init__(self, config: RationalConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        fitted = config.coefficients is None
        self.tails_on = config.tails if config.tails is not None else fitted
        detect = fitted or self.tails_on  # a start fit or the asymptotes need the activation's name
        self.sites: list[tuple[str, nn.Module, str]] = []
        inits: dict[str, str | None] = {}
        for layer in model_map.layers:
            act = self._activation(layer.activation_parent, layer.activation_attr, f"layer {layer.key}")
            inits[layer.key] = (config.init or detect_activation(
                act, model_map.model, layer.ffn_out.module.weight.device, f" of layer {layer.key}")) if detect else None
            self.sites.append((layer.key, layer.activation_parent, layer.activation_attr))
        self.pooler_init: str | None = None
        pooler = _pooler_site(model_map.model) if config.pooler else None
        if pooler is not None:
            act = self._activation(*pooler, "the pooler")
            device = next((p.device for p in pooler[0].parameters()), torch.device("cpu"))
            self.pooler_init = _pooler_activation(act, device) if detect else None
            self.sites.append((POOLER, *pooler))
        if config.shared and detect:
            names = sorted(set(inits.values()))
            if len(names) > 1:
                raise ConfigError(f"rational shared=True needs one activation in every layer, but the model uses "
                                  f"{names}; pass init= one of them or shared=False")
        ffn = {"shared": next(iter(inits.values()))} if config.shared else inits
        units = {key: self._new_unit(name) for key, name in ffn.items()}
        if pooler is not None:
            units[POOLER] = self._new_unit(self.pooler_init)
        self.units = nn.ModuleDict(units)
        self.inits = inits
        paths = _module_paths(model_map.model)
        self._paths = {layer.key: paths.get(id(layer.module)) for layer in model_map.layers}
        if pooler is not None:
            self._paths[POOLER] = paths.get(id(pooler[0]), POOLER)
        if not fitted:
            self.load_coefficients(read_coefficients(config.coefficients))

    def _new_unit(self, name: str | None) -> RationalUnit:
        m, n = self.config.numerator_degree, self.config.denominator_degree
        if name is None:  # coefficients come from a checkpoint
            start = torch.zeros(m + 1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        else:
            start = initial_coefficients(name, m, n)
        return RationalUnit(*start, tails=tail_slopes(TARGETS[name]) if self.tails_on else None)

    @staticmethod
    def _activation(parent: nn.Module, attr: str, where: str) -> object:
        act = getattr(parent, attr)
        where = f"{type(parent).__name__}.{attr} of {where}"
        if isinstance(act, (_UnitSlot, _UnitCall)):
            raise ConfigError(f"rational: {where} is already a rational unit; attach 'rational' only once")
        if isinstance(act, nn.Module):
            return act
        if not callable(act):
            raise ConfigError(f"rational: {where} is a {type(act).__name__}, not an activation module or function")
        if attr not in parent.__dict__:
            raise ConfigError(f"rational: {where} is a method of {type(parent).__name__}, not an attribute that "
                              f"can be swapped for a rational unit (and restored exactly)")
        return act

    def unit(self, key: str) -> RationalUnit:
        """The unit that layer ``key`` (``layers0``, ``encoder3``) or the pooler (``pooler``) runs."""
        return self.units["shared" if self.config.shared and key != POOLER else key]

    def rate_groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """The coefficients in their own optimizer group at the reference's ``rational_lr`` (1e-3)."""
        return {"coefficients": (list(self.parameters()), COEFFICIENT_LR)}

    def saved_config(self) -> RationalConfig:
        """The config as saved: the coefficients are in the delta itself, so the checkpoint is not read again
        at load, and the tails are as resolved here."""
        return replace(self.config, coefficients=None, tails=self.tails_on)

    def _target(self, prefix: str) -> str | None:
        """The unit a checkpoint's coefficient set ``prefix`` belongs to (None: none of them)."""
        last = prefix.rpartition(".")[2]
        if last in self.units:
            return last
        dotted = f".{prefix}."
        hits = {key for key, path in self._paths.items() if path and f".{path}." in dotted}
        if len(hits) > 1:  # a layer path inside another (none in the supported families); the longest wins
            hits = {max(hits, key=lambda k: len(self._paths[k]))}
        if not hits:
            return None
        key = hits.pop()
        return "shared" if self.config.shared and key != POOLER else key

    @torch.no_grad()
    def load_coefficients(self, sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
        """Copy ``{prefix: (numerator, denominator)}`` (see :func:`read_coefficients`) into the units, all or none."""
        chosen: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
        unmatched = []
        for prefix, (numerator, denominator) in sets.items():
            key = self._target(prefix)
            if key is None:
                unmatched.append(prefix)
                continue
            if key in chosen:
                raise ConfigError(f"rational coefficients: {chosen[key][0]!r} and {prefix!r} both go to unit {key!r}"
                                  + (" (shared=True takes one set for every layer)" if key == "shared" else ""))
            unit = self.units[key]
            if numerator.shape != unit.numerator.shape or denominator.shape != unit.denominator.shape:
                raise ConfigError(
                    f"rational coefficients: {prefix!r} has degrees ({numerator.numel() - 1}, {denominator.numel()}), "
                    f"the units ({unit.numerator.numel() - 1}, {unit.denominator.numel()}); set numerator_degree and "
                    f"denominator_degree to the checkpoint's")
            chosen[key] = (prefix, numerator, denominator)
        missing = sorted(set(self.units) - set(chosen))
        if unmatched or missing:
            hint = " (pooler=False leaves the pooler out)" if POOLER in missing or any(
                POOLER in u for u in unmatched) else ""
            raise ConfigError(f"rational coefficients do not fit this model's units: sets for no unit "
                              f"{sorted(unmatched)}, units without a set {missing}{hint}")
        for key, (_, numerator, denominator) in chosen.items():
            self.units[key].numerator.copy_(numerator.to(torch.float32))
            self.units[key].denominator.copy_(denominator.to(torch.float32))
        return sorted(chosen)

    def install(self, installer: Installer) -> None:
        for key, parent, attr in self.sites:
            unit = self.unit(key)
            original = getattr(parent, attr)
            installer.swap(parent, attr, _UnitSlot(unit) if isinstance(original, nn.Module) else _UnitCall(unit))


# ------------------------------------------------------------------------- speed path: the unit's backward
# --- speed path: the unit's hand-written backward. ``_Rational`` computes the same value as ``_evaluate`` above
# and the same gradients as autograd through it, saving only its inputs (one tensor per call, as the activation it
# replaces) and recomputing P and Q in few kernels: eager, the powers stacked into matrix-vector products
# (``_backward_stacked``); compiled, elementwise work the compiler fuses (``_backward_elementwise``).


class _Rational(torch.autograd.Function):
    """``P(x) / (1 + sum_k |b_k| |x|^k)`` on ``[lo, hi]``, continued by straight lines of fixed slopes beyond
    it (``tails``; None: the rational everywhere). Saves only its inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
                tails: tuple[float, float, float, float] | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, numerator, denominator)
        ctx.tails = tails
        return _evaluate(x, numerator, denominator, tails)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, numerator, denominator = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.compiler.is_compiling():
            return (*_backward_elementwise(x, numerator, denominator, ctx.tails, grad, needs), None)
        return (*_backward_stacked(x, numerator, denominator, ctx.tails, grad, needs), None)


def _slope(dp: torch.Tensor, ds: torch.Tensor, r: torch.Tensor, q: torch.Tensor, inner: torch.Tensor,
           xc: torch.Tensor, tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    """dR/dx = (P'(x) - R sign(x) S'(|x|)) / Q, with ``S(u) = sum_k |b_k| u^k`` and ``ds = S'(|x|)``; beyond
    the range the unit is a line, of its fixed slope whatever the coefficients."""
    slope = (dp - r * torch.sign(inner) * ds) / q
    if tails is None:
        return slope
    return torch.where(xc > tails[1], tails[3], torch.where(xc < tails[0], tails[2], slope))


def _backward_elementwise(x, numerator, denominator, tails, grad, needs):
    """The gradients as elementwise work and one sum per coefficient, for the compiler: it fuses them into a
    few kernels that recompute every power from the saved input (nothing of size N is written but the
    input's gradient). Eager, each of these would be a kernel of its own (see :func:`_backward_stacked`)."""
    dtype = _compute_dtype(x, numerator)
    a, b = numerator.to(dtype), denominator.to(dtype)
    beta = b.abs()
    xc, g = x.to(dtype), grad.to(dtype)
    inner = _clamped(xc, tails)
    u = inner.abs()
    m, n = a.shape[0] - 1, b.shape[0]
    q = _horner(u, beta) * u + 1
    r = _horner(inner, a) / q
    gq = g / q
    grad_x = grad_a = grad_b = None
    if needs[0]:
        dp = _horner(inner, a[1:] * torch.arange(1, m + 1, dtype=dtype, device=a.device)) if m else torch.zeros_like(r)
        ds = _horner(u, beta * torch.arange(1, n + 1, dtype=dtype, device=b.device))
        grad_x = (g * _slope(dp, ds, r, q, inner, xc, tails)).to(x.dtype)
    if needs[1]:  # dR/da_j = x^j / Q
        power, sums = torch.ones_like(inner), []
        for _ in range(m + 1):
            sums.append((gq * power).sum())
            power = power * inner
        grad_a = torch.stack(sums).to(numerator.dtype)
    if needs[2]:  # dR/db_k = -R sign(b_k) |x|^k / Q
        weight, power, sums = gq * r, u, []
        for _ in range(n):
            sums.append((weight * power).sum())
            power = power * u
        grad_b = (torch.stack(sums) * torch.sign(b)).neg().to(denominator.dtype)
    return grad_x, grad_a, grad_b


def _backward_stacked(x, numerator, denominator, tails, grad, needs):
    """The gradients with few kernels for eager runs: the powers as one (K, N) tensor, every polynomial a
    matrix-vector product over it."""
    dtype = _compute_dtype(x, numerator)
    a, b = numerator.to(dtype), denominator.to(dtype)
    beta = b.abs()
    xc, g = x.to(dtype).reshape(-1), grad.to(dtype).reshape(-1)
    inner = _clamped(xc, tails)
    m, n = a.shape[0] - 1, b.shape[0]
    # powers x^1 .. x^K as the rows of one (K, N) tensor, each row one multiplication of the last:
    # every polynomial below (values, slopes) is then one matrix-vector product over it, where Horner's
    # rule took a full-tensor kernel per degree (benchmarks/op_counts.py). Not a cumulative product
    # along a width-K axis: CUDA's scan over such short rows took 73 ms a layer on an H100 at BERT-base
    # (docs/findings.md). The denominator's |x|^k = |x^k| are the first n rows' sizes.
    rows = [inner]
    for _ in range(max(m, n) - 1):
        rows.append(rows[-1] * inner)
    powers = torch.stack(rows)
    sizes = powers[:n].abs()

    def poly(over: torch.Tensor, c0: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:  # c0 + sum c_j t^j
        k = coefficients.shape[0]
        return c0.expand_as(inner) if k == 0 else torch.addmv(c0, over[:k].t(), coefficients)

    p = poly(powers, a[0], a[1:])
    q = poly(sizes, b.new_ones(()), beta)
    r = p / q
    gq = g / q
    grad_x = grad_a = grad_b = None
    if needs[0]:
        dp = poly(powers, a[1], a[2:] * torch.arange(2, m + 1, dtype=dtype, device=a.device)) if m \
            else torch.zeros_like(p)
        ds = poly(sizes, beta[0], beta[1:] * torch.arange(2, n + 1, dtype=dtype, device=b.device))  # S'(|x|)
        grad_x = (g * _slope(dp, ds, r, q, inner, xc, tails)).to(x.dtype).reshape(x.shape)
    # the coefficients act through R(clamped x) alone (the tails' slopes are fixed). Their gradients
    # are row sums of the powers times a weight: an elementwise product and a reduction over N, which
    # the GPU splits over many blocks; as ``powers @ g``, cuBLAS' matrix-vector product would give
    # each of the K outputs (a sum over N = 12.6M at BERT-base) to few blocks.
    if needs[1]:  # dR/da_j = x^j / Q
        grad_a = torch.cat([gq.sum().reshape(1), (powers[:m] * gq).sum(1)]).to(numerator.dtype)
    if needs[2]:  # dR/db_k = -R sign(b_k) |x|^k / Q
        grad_b = ((sizes * (gq * r)).sum(1) * torch.sign(b)).neg_().to(denominator.dtype)
    return grad_x, grad_a, grad_b

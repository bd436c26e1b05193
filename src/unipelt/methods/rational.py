"""Rational activations, RAFT (Fang et al. 2022): the FFN non-linearity becomes a trainable rational unit.

Every layer's FFN activation is replaced by the "safe" Pade unit

    R(x) = P(x) / Q(x) = (a_0 + a_1 x + ... + a_m x^m) / (1 + |S(x)|),   S(x) = b_1 x + ... + b_n x^n,

with ``m = 5`` and ``n = 4`` by default (``numerator_degree``, ``denominator_degree``). Q >= 1, so the
unit has no poles. Its trainable parameters are ``numerator`` (a_0..a_m) and ``denominator`` (b_1..b_n),
float32. Its coefficients start at a fit of the activation the model was trained with
(GELU, ReLU or SiLU; found by running the model's own activation on a probe grid, or named by
``init``), so the model changes at init only by the fit error. Only the coefficients train (the
task head trains as usual); everything else stays frozen.

Beyond the fit range the unit continues as straight lines along the activation's asymptotes, so
inputs far outside it (pretrained FFNs reach beyond +-20) get about what the activation gives, not the
rational's growth (see :class:`RationalUnit` and :func:`tail_slopes`).

The fit (:func:`fit_rational`, once per activation and degrees, cached in-process) runs in float64
on ``[-5, 5]``: a linear least-squares start (``P - f (1 + S)``, the absolute value left out), then
Levenberg-Marquardt steps on the true residual ``R - f``, then Lawson's reweighting (weights times
the residual's size, repeated) that trades mean error for a smaller maximum error. Maximum errors
on ``[-5, 5]`` with m = 5, n = 4: GELU 2.4e-3, SiLU 2.6e-5, ReLU 2.2e-2. ReLU's kink bounds what a
type (5, 4) unit can do there: a search from many starting points found nothing under 0.0215 (ReLU
scales, so that is five times the error on ``[-1, 1]``); degrees (7, 6) bring it to 6e-3.

The unit computes in float32 (float64 for a float64 model) whatever the input's dtype, autocast
included, and returns the input's dtype. Its backward recomputes P and Q from the saved input, so
training keeps one tensor per call, as the activation it replaces did. Eager, the backward stacks the
powers of x (few kernels); under ``torch.compile`` it is elementwise work and one sum per coefficient,
which the compiler fuses into a few kernels.

``shared=True`` uses one unit for every layer instead of one per layer. Parameters: ``L (m + 1 + n)``
for L layers (all stacks of an encoder-decoder), or ``m + 1 + n`` when shared. Not mergeable: no
base weight can hold a rational function, so ``merge`` keeps the units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig, register
from ..runtime import Installer
from ..sites import LayerSites, ModelMap
from .base import DeltaMethod

INITS = ("gelu", "relu", "silu")
FIT_RANGE = (-5.0, 5.0)
FIT_POINTS = 2001
_PROBE_TOLERANCE = 1e-3  # tanh approximations of GELU are within 4.8e-4 of the exact one; QuickGELU is 2e-2 off
_CONFIG_KEYS = ("hidden_act", "activation_function", "activation", "dense_act_fn", "hidden_activation")
_CONFIG_NAMES = {
    "gelu": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_python": "gelu",
    "gelu_python_tanh": "gelu", "gelu_accurate": "gelu", "gelu_10": "gelu",
    "relu": "relu", "silu": "silu", "swish": "silu",
}


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_min(0)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": _gelu, "relu": _relu, "silu": _silu}


@register
@dataclass
class RationalConfig(MethodConfig):
    method = "rational"
    description = "RAFT: the FFN activation becomes a trainable rational unit P(x) / (1 + |S(x)|), fitted to it"

    numerator_degree: int = 5
    denominator_degree: int = 4
    init: str | None = None  # the activation to fit; None: the model's own, detected per layer
    shared: bool = False  # one unit for every layer instead of one per layer

    def validate(self) -> None:
        super().validate()
        self.require_positive_ints("numerator_degree", "denominator_degree")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"rational init must be one of {list(INITS)} or None (detect the model's own), "
                              f"got {self.init!r}")
        if not isinstance(self.shared, bool):
            raise ConfigError(f"rational shared must be true or false, got {self.shared!r}")


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


def _evaluate(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
              tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    """The unit's value (see :func:`rational`), as plain differentiable tensor operations."""
    dtype = _compute_dtype(x, numerator)
    xc = x.to(dtype)
    inner = _clamped(xc, tails)
    p = _horner(inner, numerator.to(dtype))
    s = _horner(inner, denominator.to(dtype)) * inner
    out = p / (1 + s.abs())
    if tails is not None:
        out = out + (xc - inner) * torch.where(xc > tails[1], tails[3], tails[2])
    return out.to(x.dtype)


class _Rational(torch.autograd.Function):
    """``P(x) / (1 + |x T(x)|)`` with ``T(x) = sum_k b_k x^(k-1)`` on ``[lo, hi]``, continued by straight
    lines of fixed slopes beyond it (``tails``; None: the rational everywhere). Saves only its inputs."""

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


def _clamped(xc: torch.Tensor, tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    # by ``where``, not ``clamp``: clamp's gradient is 0 on the bounds themselves (bfloat16 holds +-5
    # exactly), where the unit's slope is the rational's
    return xc if tails is None else torch.where(xc > tails[1], tails[1], torch.where(xc < tails[0], tails[0], xc))


def _slope(dp: torch.Tensor, ds: torch.Tensor, r: torch.Tensor, sign: torch.Tensor, q: torch.Tensor,
           xc: torch.Tensor, tails: tuple[float, float, float, float] | None) -> torch.Tensor:
    """dR/dx = (P' - R sign(S) S') / Q from the polynomials' values and slopes; beyond the range the unit is
    a line, of its fixed slope whatever the coefficients."""
    slope = (dp - r * sign * ds) / q
    if tails is None:
        return slope
    return torch.where(xc > tails[1], tails[3], torch.where(xc < tails[0], tails[2], slope))


def _backward_elementwise(x, numerator, denominator, tails, grad, needs):
    """The gradients as elementwise work and one sum per coefficient, for the compiler: it fuses them into a
    few kernels that recompute every power from the saved input (nothing of size N is written but the
    input's gradient). Eager, each of these would be a kernel of its own (see :func:`_backward_stacked`)."""
    dtype = _compute_dtype(x, numerator)
    a, b = numerator.to(dtype), denominator.to(dtype)
    xc, g = x.to(dtype), grad.to(dtype)
    inner = _clamped(xc, tails)
    m, n = a.shape[0] - 1, b.shape[0]
    s = _horner(inner, b) * inner
    sign = torch.sign(s)
    q = s.abs() + 1
    r = _horner(inner, a) / q
    gq = g / q
    grad_x = grad_a = grad_b = None
    if needs[0]:
        dp = _horner(inner, a[1:] * torch.arange(1, m + 1, dtype=dtype, device=a.device)) if m else torch.zeros_like(r)
        ds = _horner(inner, b * torch.arange(1, n + 1, dtype=dtype, device=b.device))
        grad_x = (g * _slope(dp, ds, r, sign, q, xc, tails)).to(x.dtype)
    if needs[1] or needs[2]:
        power, sums_a, sums_b = torch.ones_like(inner), [], []
        weight_b = gq * r * sign if needs[2] else None
        for j in range(max(m, n) + 1):
            if j <= m and needs[1]:
                sums_a.append((gq * power).sum())
            if 1 <= j <= n and needs[2]:
                sums_b.append((weight_b * power).sum())
            power = power * inner
        grad_a = torch.stack(sums_a).to(numerator.dtype) if needs[1] else None
        grad_b = torch.stack(sums_b).neg().to(denominator.dtype) if needs[2] else None
    return grad_x, grad_a, grad_b


def _backward_stacked(x, numerator, denominator, tails, grad, needs):
    """The gradients with few kernels for eager runs: the powers as one (K, N) tensor, every polynomial a
    matrix-vector product over it."""
    dtype = _compute_dtype(x, numerator)
    a, b = numerator.to(dtype), denominator.to(dtype)
    xc, g = x.to(dtype).reshape(-1), grad.to(dtype).reshape(-1)
    inner = _clamped(xc, tails)
    m, n = a.shape[0] - 1, b.shape[0]
    # powers x^1 .. x^K as the rows of one (K, N) tensor, each row one multiplication of the last:
    # every polynomial below (values, slopes) is then one matrix-vector product over it, where Horner's
    # rule took a full-tensor kernel per degree (benchmarks/op_counts.py). Not a cumulative product
    # along a width-K axis: CUDA's scan over such short rows took 73 ms a layer on an H100 at BERT-base
    # (h100_bert_base_catalogue_run3).
    rows = [inner]
    for _ in range(max(m, n) - 1):
        rows.append(rows[-1] * inner)
    powers = torch.stack(rows)

    def poly(c0: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:  # c0 + sum_j c_j x^j
        k = coefficients.shape[0]
        return c0.expand_as(inner) if k == 0 else torch.addmv(c0, powers[:k].t(), coefficients)

    p = poly(a[0], a[1:])
    s = poly(b.new_zeros(()), b)
    dp = poly(a[1], a[2:] * torch.arange(2, m + 1, dtype=dtype, device=a.device)) if m else torch.zeros_like(p)
    ds = poly(b[0], b[1:] * torch.arange(2, n + 1, dtype=dtype, device=b.device))
    sign = torch.sign(s)
    q = s.abs().add_(1)
    r = p / q
    gq = g / q
    grad_x = grad_a = grad_b = None
    if needs[0]:
        grad_x = (g * _slope(dp, ds, r, sign, q, xc, tails)).to(x.dtype).reshape(x.shape)
    # the coefficients act through R(clamped x) alone (the tails' slopes are fixed). Their gradients
    # are row sums of the powers times a weight: an elementwise product and a reduction over N, which
    # the GPU splits over many blocks; as ``powers @ g``, cuBLAS' matrix-vector product would give
    # each of the K outputs (a sum over N = 12.6M at BERT-base) to few blocks.
    if needs[1]:  # dR/da_j = x^j / Q
        grad_a = torch.cat([gq.sum().reshape(1), (powers[:m] * gq).sum(1)]).to(numerator.dtype)
    if needs[2]:  # dR/db_k = -R sign(S) x^k / Q
        grad_b = (powers[:n] * (gq * r * sign)).sum(1).neg_().to(denominator.dtype)
    return grad_x, grad_a, grad_b


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor,
             tails: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """The safe Pade unit ``(sum_j a_j x^j) / (1 + |sum_k b_k x^k|)`` elementwise, on any shape.

    ``numerator`` holds ``a_0 .. a_m``, ``denominator`` holds ``b_1 .. b_n``. With ``tails = (lo, hi,
    slope_lo, slope_hi)`` the unit is that rational on ``[lo, hi]`` and continues as straight lines of
    those slopes outside. Computed in float32 (or float64 when the input or coefficients are),
    returned in the input's dtype.
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
    vq = torch.stack([x ** k for k in range(1, c.shape[0] - m)], 1)
    sw = weights.sqrt()

    def residual(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, s = vp @ c[:m + 1], vq @ c[m + 1:]
        q = 1 + s.abs()
        return p / q - y, q, s

    r, q, s = residual(c)
    cost = float(((sw * r) ** 2).sum())
    damping = 1e-3
    for _ in range(iterations):
        jac = torch.cat([vp / q[:, None], (-(r + y) / q * torch.sign(s))[:, None] * vq], 1) * sw[:, None]
        scale = (jac ** 2).sum(0).clamp_min(1e-30).sqrt()
        improved = False
        while damping < 1e12:
            system = torch.cat([jac, torch.diag(math.sqrt(damping) * scale)], 0)
            target = torch.cat([-sw * r, torch.zeros_like(c)])
            step = torch.linalg.lstsq(system, target[:, None], driver="gelsd").solution[:, 0]
            trial = c + step
            r_new, q_new, s_new = residual(trial)
            new_cost = float(((sw * r_new) ** 2).sum())
            if math.isfinite(new_cost) and new_cost < cost:
                improved = cost - new_cost > 1e-12 * cost
                c, r, q, s, cost = trial, r_new, q_new, s_new, new_cost
                damping = max(damping / 3, 1e-12)
                break
            damping *= 4
        if not improved:
            break
    return c


def fit_rational(fn: Callable[[torch.Tensor], torch.Tensor], m: int = 5, n: int = 4, lo: float = FIT_RANGE[0],
                 hi: float = FIT_RANGE[1], points: int = FIT_POINTS,
                 lawson_rounds: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the safe Pade unit of degrees (m, n) that fit ``fn`` on ``[lo, hi]``, in float64.

    Returns ``(numerator a_0..a_m, denominator b_1..b_n)``. A linear least-squares start, then
    Levenberg-Marquardt on ``R - fn`` (absolute value included), then ``lawson_rounds`` rounds of
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
    vq = torch.stack([x ** k for k in range(1, n + 1)], 1)
    start = torch.linalg.lstsq(torch.cat([vp, -y[:, None] * vq], 1), y[:, None], driver="gelsd").solution[:, 0]
    weights = torch.full_like(x, 1.0 / points)
    c = _levenberg_marquardt(start, x, y, weights, m, iterations=100)

    def max_error(c: torch.Tensor) -> tuple[float, torch.Tensor]:
        r = (vp @ c[:m + 1]) / (1 + (vq @ c[m + 1:]).abs()) - y
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
    """The fit of activation ``name`` ("gelu", "relu", "silu"), computed once per process and degrees."""
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
def _probe(act: Callable, device: torch.device) -> str | None:
    """Which of GELU, ReLU, SiLU ``act`` computes on the fit range (None: none of them)."""
    x = torch.linspace(*FIT_RANGE, 1001, dtype=torch.float32)
    y = act(x.to(device).clone()).to("cpu", torch.float32)
    errors = {name: float((y - fn(x)).abs().max()) for name, fn in TARGETS.items()}
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


# ------------------------------------------------------------------------------------------ the method


class Rational(DeltaMethod):
    config_class = RationalConfig

    def __init__(self, config: RationalConfig, model_map: ModelMap):
        super().__init__(config, model_map)
        self.sites: list[tuple[str, nn.Module, str]] = []
        inits: dict[str, str] = {}
        for layer in model_map.layers:
            act = self._activation(layer)
            inits[layer.key] = config.init or detect_activation(
                act, model_map.model, layer.ffn_out.module.weight.device, f" of layer {layer.key}")
            self.sites.append((layer.key, layer.activation_parent, layer.activation_attr))
        m, n = config.numerator_degree, config.denominator_degree
        if config.shared:
            names = sorted(set(inits.values()))
            if len(names) > 1:
                raise ConfigError(f"rational shared=True needs one activation in every layer, but the model uses "
                                  f"{names}; pass init= one of them or shared=False")
            self.units = nn.ModuleDict({"shared": RationalUnit(*initial_coefficients(names[0], m, n),
                                                               tails=tail_slopes(TARGETS[names[0]]))})
        else:
            self.units = nn.ModuleDict({k: RationalUnit(*initial_coefficients(name, m, n),
                                                        tails=tail_slopes(TARGETS[name]))
                                        for k, name in inits.items()})
        self.inits = inits

    @staticmethod
    def _activation(layer: LayerSites) -> object:
        parent, attr = layer.activation_parent, layer.activation_attr
        act = getattr(parent, attr)
        where = f"{type(parent).__name__}.{attr} of layer {layer.key}"
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
        """The unit that layer ``key`` (``layers0``, ``encoder3``) runs."""
        return self.units["shared" if self.config.shared else key]

    def install(self, installer: Installer) -> None:
        for key, parent, attr in self.sites:
            unit = self.unit(key)
            original = getattr(parent, attr)
            installer.swap(parent, attr, _UnitSlot(unit) if isinstance(original, nn.Module) else _UnitCall(unit))

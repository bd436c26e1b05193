"""SparseAdapter (He et al., Findings of EMNLP 2022): a bottleneck adapter pruned once, at initialisation.

``A(x) = W_up D(f(W_down LN(x) + b_down)) + b_up``, ``h + A(h)``, with ``W = W_stored * mask`` (a fixed 0/1 mask
per weight matrix, chosen by SNIP before training), ``LN`` a LayerNorm of the adapter's own and ``D`` dropout.
Reference: Shwai-He/SparseAdapter@b190084, ``petl/petl_factory.py`` ``Adapter_Layer`` (LayerNorm ``"in"``,
ReLU, dropout, ``x @ (W * mask)^T``; ``init_bert_weights``), ``src/transformers/pruning/Pruners/pruners.py``
(SNIP scores, ``_global_mask``), ``petl/options.py`` (``mask_scope`` ``global``) and the GLUE recipe
``examples/pytorch/text-classification/run_glue.sh`` (attention and FFN adapters, m = 64, lr 1e-4).

The reference's settings are the defaults here: Houlsby placement (a sequential adapter after every
attention and after the FFN, before the residual add), ``m = 64``, ReLU; ``layer_norm`` (a LayerNorm over
the adapter's input, gain 1 and bias 0 at init, trained; the residual adds the un-normalised ``h``);
``dropout`` 0.1 on ``f(.)`` in training (the reference's ``hidden_dropout_prob``, 0.1 on BERT and RoBERTa);
``init="bert"``: ``W_down`` and ``W_up`` ~ N(0, 0.02^2), biases zero, so the model is not exactly the base
model at init; ``sparsity`` 0.4 (the paper's recommended ratio); ``scope="global"``; learning rate 1e-4
(``reference_lr``; the recipe's weight decay 0.1 is the trainer's ``weight_decay``). Placement, parallel,
scaling, UniPELT gate and activation are ``adapter``'s options. Every weight is multiplied by its mask (a
boolean buffer) in the forward pass, so a pruned weight has zero gradient and no effect whatever the optimiser
does to its stored value (AdamW's weight decay included). Biases, the LayerNorm and gates stay dense. Right
after ``attach`` every mask is all ones: the method is a dense adapter until :func:`snip_prune` runs.

``sparsity`` s (0 <= s < 1) is the fraction of the adapter weights pruned (the paper's "sparse ratio"; the
reference code's ``--sparsity`` is the kept fraction). ``large_sparse`` (default False) enlarges the
bottleneck to ``m' = floor(m / (1 - s) + 1/2)`` and keeps ``d m`` weights per ``d m'`` (per matrix in local
scope, on average in global scope): the weight non-zeros equal a dense adapter's of bottleneck m exactly, and
the achieved sparsity is ``1 - m / m'`` (s up to rounding of m').

SNIP (:func:`snip_prune`, Lee et al. 2019): the saliency of a weight is ``|dL/dw * w|``, the gradient summed
over the given batches (the trainer gives 320 training examples, the reference's ``args.length * 32``), the
model in eval mode (no dropout: the scores are deterministic) and every mask set to ones
first. ``scope``:

- ``"global"`` (the reference's ``mask_scope``): one threshold over all weight matrices of the method, which
  keeps the ``K`` highest scores of all of them, ``K = floor((1 - s) N + 1/2)`` of their ``N`` weights
  (``N m / m'`` with ``large_sparse``); each matrix's density is what its scores earn (an adapter may lose
  most of a matrix);
- ``"local"``: each matrix keeps its own top ``k = floor((1 - s) n + 1/2)`` (at least 1; ``n m / m'`` with
  ``large_sparse``), so every matrix has the requested density.

Ties go to the lower flat index (stable sort; in global scope over the matrices in site order, down before
up). A zero-initialised ``W_up`` (``init="lora"``, the parallel adapter's default) has ``|g * w| = 0``
everywhere, and because ``W_up = 0`` also blocks the gradient to ``W_down``, so has ``W_down``. Then each
all-zero matrix is scored at its first step ``-c g`` (``c`` scales it to the RMS of ``nn.Linear``'s
initialisation, ``1 / sqrt(3 fan_in)``): by ``|g|`` in local scope (the same order as ``|g * (-c g)|``), by
``c g^2`` in global scope, and the other matrices by ``|g * w|`` with the all-zero matrices set to that step
(in local scope masked by their own masks first). The zero matrices are restored exactly (zero) afterwards.
Nothing is random and stored weights are not modified: ``snip_prune`` run again on the same model and
batches gives the same masks.

Parameters per adapter (``trainable_parameters`` counts the stored, dense tensors): ``2 d m' + d + m'``, plus
``2 d`` for the LayerNorm (gate: ``d + 1``); of those, the kept weights plus the rest can be non-zero
(``SparseAdapter.nonzero_parameters``).

Saved deltas (``unipelt.save``) hold, for each pruned matrix, ``<matrix>.values`` (the kept weights in
flat row-major order), ``<matrix>.shape`` (int64) and where they sit: ``<matrix>.bitmask`` (the mask, one
bit per entry, packed eight to a uint8 byte, least significant bit first) or, when that is smaller, for
very sparse matrices (fewer kept entries than one in 32), ``<matrix>.indices`` (flat indices, int32, int64
past 2^31 entries). A matrix whose mask is all ones is stored dense as ``<matrix>.weight``. Loading reads
either form and rebuilds weights (zero where pruned) and masks exactly. A float32 matrix at sparsity s
then takes ``(1 - s) * 4 + 1/8`` bytes per entry against 4 dense; a BERT-base-sized adapter (m = 64,
biases dense) saves to 54% of the dense file at s = 0.5 (2.56 vs 4.76 MB), 24% at s = 0.8 (1.14 MB; 1.94
with indices alone) and 3% at s = 0.99. Not mergeable (non-linearity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..registry import register_method
from ..runtime import Installer
from .adapter import Adapter, AdapterConfig, init_bottleneck
from .base import activation, cast_like, matmul_input

SCOPES = ("global", "local")


@dataclass
class SparseAdapterConfig(AdapterConfig):
    method = "sparse_adapter"
    description = "SparseAdapter: bottleneck adapter pruned at init by SNIP, fixed masks; Large-Sparse (He 2022)"
    reference_lr: ClassVar[float | None] = 1e-4  # run_glue.sh, run_summarization.sh

    bottleneck: int = 64
    placement: str = "houlsby"  # the reference's attention and FFN adapters
    dropout: float | None = 0.1  # on f(W_down x) in training
    sparsity: float = 0.4  # fraction of the adapter weights pruned
    scope: str = "global"  # "global": one SNIP threshold over all matrices; "local": per matrix
    layer_norm: bool = True  # a LayerNorm over the adapter's input
    large_sparse: bool = False  # bottleneck m / (1 - s) at the dense adapter's count of non-zero weights

    def validate(self) -> None:
        super().validate()
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
            raise ConfigError(f"sparse_adapter sparsity is the fraction of weights pruned, 0 <= sparsity < 1; "
                              f"got {s!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"sparse_adapter scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("large_sparse", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"sparse_adapter {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def effective_bottleneck(self) -> int:
        """``m`` itself, or with ``large_sparse`` ``m' = floor(m / (1 - s) + 1/2)``."""
        if not self.large_sparse:
            return self.bottleneck
        return max(self.bottleneck, math.floor(self.bottleneck / (1.0 - self.sparsity) + 0.5))

    def kept(self, numel: int) -> int:
        """How many of ``numel`` adapter weights (one matrix in local scope, all of them in global) the mask keeps."""
        if self.large_sparse:  # numel = d m': keep d m, the dense adapter's count
            return numel * self.bottleneck // self.effective_bottleneck
        return min(numel, max(1, math.floor((1.0 - self.sparsity) * numel + 0.5)))


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed boolean ``mask`` (a buffer) in every forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.masked_weight()
        return F.linear(matmul_input(x, w), w, self.bias)

    def sparse_state(self) -> dict[str, torch.Tensor]:
        """The weight as saved: dense when nothing is pruned, else kept values, shape and the smaller of a
        packed bitmask and flat indices."""
        w = self.weight.detach()
        if bool(self.mask.all()):
            return {"weight": w}
        flat = self.mask.reshape(-1)
        idx = flat.nonzero().squeeze(1)  # ascending
        index_dtype = torch.int32 if w.numel() < 2**31 else torch.int64
        state = {"values": w.reshape(-1)[idx], "shape": torch.tensor(list(w.shape), dtype=torch.int64)}
        index_bytes = idx.numel() * torch.empty((), dtype=index_dtype).element_size()
        if index_bytes < math.ceil(flat.numel() / 8):
            state["indices"] = idx.to(index_dtype)
        else:
            state["bitmask"] = pack_bits(flat)
        return state

    @torch.no_grad()
    def load_sparse_state(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Rebuild weight and mask from :meth:`sparse_state`'s tensors; a :class:`ConfigError` if they do not fit."""
        shape = tuple(self.weight.shape)
        if set(state) == {"weight"}:
            if tuple(state["weight"].shape) != shape:
                raise ConfigError(f"{where}.weight has shape {tuple(state['weight'].shape)}, expected {shape}")
            self.weight.copy_(state["weight"])
            self.mask.fill_(True)
            return
        if set(state) not in ({"values", "indices", "shape"}, {"values", "bitmask", "shape"}):
            raise ConfigError(f"{where}: expected 'weight', or 'values', 'shape' and 'bitmask' or 'indices', got "
                              f"{sorted(state)}")
        values, saved = state["values"], state["shape"]
        if tuple(int(s) for s in saved.reshape(-1).tolist()) != shape:
            raise ConfigError(f"{where} was saved with shape {saved.tolist()}, expected {list(shape)}")
        if "bitmask" in state:
            packed = state["bitmask"]
            if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(self.mask.numel() / 8):
                raise ConfigError(f"{where}.bitmask: {packed.numel()} {packed.dtype} bytes cannot hold the mask of a "
                                  f"{list(shape)} matrix ({math.ceil(self.mask.numel() / 8)} uint8 bytes)")
            flat = unpack_bits(packed, self.mask.numel())
            if int(flat.sum()) != values.numel() or values.dim() != 1:
                raise ConfigError(f"{where}: the bitmask keeps {int(flat.sum())} entries but {values.numel()} values "
                                  f"were saved")
            indices = flat.nonzero().squeeze(1)
        else:
            indices = state["indices"]
        if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or values.shape != indices.shape:
            raise ConfigError(f"{where}: {values.numel()} values and {indices.numel()} {indices.dtype} indices "
                              f"do not pair up")
        idx = indices.to(device=self.mask.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.weight.numel()):
            raise ConfigError(f"{where}: indices out of range for a {list(shape)} matrix")
        self.weight.zero_()
        self.weight.view(-1)[idx] = values.to(device=self.weight.device, dtype=self.weight.dtype)
        self.mask.fill_(False)
        self.mask.view(-1)[idx] = True


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as uint8 bytes, eight flags a byte, the first flag in the least significant bit."""
    padded = torch.zeros(math.ceil(flags.numel() / 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[: flags.numel()] = flags.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flags.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` flags of :func:`pack_bits`' bytes, as a 1-D bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & 1).reshape(-1)[:count].bool()


class SparseBottleneck(nn.Module):
    """``W_up f(W_down LN(h) + b_down) + b_up`` with masked weights (``norm`` None: no LayerNorm)."""

    def __init__(self, d: int, m: int, act: str, init: str, layer_norm: bool):
        super().__init__()
        self.down = MaskedLinear(d, m)  # same construction order as adapter.Bottleneck: same weights per seed
        self.act = activation(act)
        self.up = MaskedLinear(m, d)
        init_bottleneck(self.down, self.up, init)
        self.norm = nn.LayerNorm(d) if layer_norm else None

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if norm is None:
            return x
        return F.layer_norm(x, norm.normalized_shape, cast_like(norm.weight, x), cast_like(norm.bias, x), norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.normalised(x))))


@register_method(SparseAdapterConfig)
class SparseAdapter(Adapter):
    def _bottleneck(self, d: int) -> nn.Module:
        config: SparseAdapterConfig = self.config
        return SparseBottleneck(d, config.effective_bottleneck, config.activation, config.resolved_init,
                                config.layer_norm)

    def _plain_weights(self, site_key: str) -> tuple[torch.Tensor, ...]:
        bottleneck = self.adapters[site_key]
        return bottleneck.down.masked_weight(), bottleneck.down.bias, bottleneck.up.masked_weight(), bottleneck.up.bias

    def _add_delta(self, installer: Installer, site_key: str, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The adapter reads ``LN(x)``; the residual stays ``x``'s (dropout, fused path and gate as ``adapter``)."""
        return super()._add_delta(installer, site_key, self.adapters[site_key].normalised(x), residual)

    def masked_layers(self) -> dict[str, MaskedLinear]:
        """Every masked matrix by its module name (``adapters.<site>.down`` / ``.up``)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MaskedLinear)}

    def nonzero_parameters(self) -> int:
        """Parameters that can be non-zero: kept weights, plus every bias, LayerNorm and gate parameter."""
        masked = {id(layer.weight): layer for layer in self.masked_layers().values()}
        return sum(int(masked[id(p)].mask.sum()) if id(p) in masked else p.numel() for p in self.parameters())

    def delta_state(self) -> dict[str, torch.Tensor]:
        layers = self.masked_layers()
        state = {}
        for k, v in self.state_dict().items():
            owner, _, leaf = k.rpartition(".")
            if not (owner in layers and leaf in ("weight", "mask")):
                state[k] = v.detach()
        for name, layer in layers.items():
            state.update({f"{name}.{k}": v for k, v in layer.sparse_state().items()})
        return state

    def load_delta_state(self, state: dict[str, torch.Tensor]) -> None:
        layers = self.masked_layers()
        own: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
        rest = {}
        for k, v in state.items():
            owner, _, leaf = k.rpartition(".")
            if owner in layers and leaf in ("weight", "values", "indices", "bitmask", "shape"):
                own[owner][leaf] = v
            else:
                rest[k] = v
        missing, unexpected = self.load_state_dict(rest, strict=False)
        missing = [k for k in missing if not (k.rpartition(".")[0] in layers and k.rpartition(".")[2] in
                                              ("weight", "mask"))]
        if missing or unexpected:
            raise ConfigError(f"saved delta does not fit method '{self.config.method}': missing {missing[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
        for name, layer in layers.items():
            layer.load_sparse_state(own[name], name)

    # --- speed path: the masked weights (``_plain_weights``) run through :mod:`unipelt.kernels.bottleneck`'s fused
    # kernels, which compute the same ``f(x W_d^T + b_d) W_u^T + b_u`` on them.
    def _fusable(self, site_key: str) -> bool:
        return True


def sparse_adapters(model: nn.Module) -> dict[str, SparseAdapter]:
    """The attached sparse adapters of ``model`` by method name (empty when there are none)."""
    from ..core import deltas  # core imports the methods package: import it late

    return {name: m for name, m in deltas(model).items() if isinstance(m, SparseAdapter)}


def _loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(output)
    else:
        loss = getattr(output, "loss", None)
        if loss is None:
            raise ConfigError("snip_prune: the model returned no loss; give the batches labels "
                              "(e.g. 'labels') or pass loss_fn(output) -> scalar tensor")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"snip_prune: the loss must be a scalar tensor, got {type(loss).__name__}"
                          f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}")
    return loss.reshape(())


def _gradients(model: nn.Module, layers: dict[str, MaskedLinear], batches: list[Mapping[str, Any]],
               loss_fn: Callable[[Any], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``dL/dW`` of each layer's stored weight, summed over ``batches``; no ``.grad`` is touched."""
    params = [layer.weight for layer in layers.values()]
    flags = [p.requires_grad for p in params]
    total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    device = params[0].device
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = _loss(model(**moved), loss_fn)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(total, grads, strict=True):
                    if g is not None:
                        acc.add_(g.to(acc.dtype))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return dict(zip(layers, total, strict=True))


def _top_mask(score: torch.Tensor, keep: int, where: str) -> torch.Tensor:
    """A boolean mask of the ``keep`` highest scores; ties to the lower flat index."""
    flat = score.detach().reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise FloatingPointError(f"snip_prune: the saliency of {where} is not finite; is the loss on the given "
                                 f"batches NaN or infinite?")
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(score.shape)


@torch.no_grad()
def snip_prune(model: nn.Module, batches: Iterable[Mapping[str, Any]],
               loss_fn: Callable[[Any], torch.Tensor] | None = None) -> dict[str, float]:
    """Prune every attached sparse adapter of ``model`` by SNIP saliency on ``batches``; fix its masks.

    ``batches`` are model inputs (dicts of tensors, moved to the adapters' device). The loss is
    ``loss_fn(output)`` when ``loss_fn`` is given, else the output's ``.loss`` (batches with labels, e.g.
    ``labels`` for classification or language modelling). Scoring follows the module docstring: masks
    reset to ones, eval mode (each module's train/eval flag is restored), ``|g * w|`` kept by one threshold
    over each method's matrices (``scope="global"``) or per matrix (``"local"``), ties to the lower index;
    all-zero matrices scored at their first step. Stored weights are left as they are (a zero ``W_up`` stays
    zero), and no random numbers are drawn. Returns the achieved sparsity of each matrix, keyed
    ``"<method name>.<site>.down"`` / ``".up"``.
    """
    methods = sparse_adapters(model)
    if not methods:
        raise ConfigError("snip_prune: no sparse_adapter is attached to this model (unipelt.attach it first)")
    batches = list(batches)
    if not batches:
        raise ConfigError("snip_prune needs at least one batch of training inputs")
    layers: dict[str, MaskedLinear] = {}
    configs: dict[str, SparseAdapterConfig] = {}
    groups: dict[str, list[str]] = {}  # global scope: each method's matrices, pruned together
    for name, method in methods.items():
        for site_key, bottleneck in method.adapters.items():
            for part in ("down", "up"):
                key = f"{name}.{site_key}.{part}"
                layers[key], configs[key] = getattr(bottleneck, part), method.config
                if method.config.scope == "global":
                    groups.setdefault(name, []).append(key)
    for layer in layers.values():
        layer.mask.fill_(True)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        first = _gradients(model, layers, batches, loss_fn)
        zero = [k for k, layer in layers.items() if not bool(layer.weight.any())]
        steps = {}  # an all-zero matrix's first step is -c g: c scales it to nn.Linear's RMS, 1 / sqrt(3 fan_in)
        for k in zero:
            rms = float(first[k].pow(2).mean().sqrt())
            steps[k] = 1.0 / (math.sqrt(3.0 * layers[k].in_features) * rms) if rms > 0 else 0.0
            if configs[k].scope == "local":  # ordered as |g * (-c g)|; the mask masks its step below
                layers[k].mask.copy_(_top_mask(first[k].abs(), configs[k].kept(layers[k].weight.numel()), k))
        second = first
        if zero and len(zero) < len(layers):
            try:
                for k in zero:
                    layers[k].weight.copy_(-steps[k] * first[k])
                second = _gradients(model, layers, batches, loss_fn)
            finally:
                for k in zero:
                    layers[k].weight.zero_()
        scores = {k: steps[k] * first[k].square() if k in zero else (second[k] * layer.weight.to(second[k].dtype)).abs()
                  for k, layer in layers.items() if not (k in zero and configs[k].scope == "local")}
        for k, layer in layers.items():
            if configs[k].scope == "local" and k not in zero:
                layer.mask.copy_(_top_mask(scores[k], configs[k].kept(layer.weight.numel()), k))
        for name, keys in groups.items():
            flat = torch.cat([scores[k].reshape(-1).to("cpu", torch.float64) for k in keys])
            kept = _top_mask(flat, configs[keys[0]].kept(flat.numel()), name)
            for k, part in zip(keys, kept.split([layers[k].mask.numel() for k in keys]), strict=True):
                layers[k].mask.copy_(part.view(layers[k].mask.shape))
    except BaseException:
        for layer in layers.values():  # an interrupted pruning leaves a dense adapter, not a half-pruned one
            layer.mask.fill_(True)
        raise
    finally:
        for m, flag in modes.items():
            m.training = flag
    return {k: 1.0 - int(layer.mask.sum()) / layer.mask.numel() for k, layer in layers.items()}

"""Sharded training: what the library must do when FSDP or DeepSpeed ZeRO-3 holds the parameters in shards.

Under FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2, which ``accelerate`` uses with ``fsdp_version: 2``;
or FSDP1's ``FullyShardedDataParallel``) and ZeRO-3, each process holds a slice of every parameter outside the
forward pass. Reading a delta then reads a slice (FSDP2: a ``DTensor``; FSDP1 without ``use_orig_params``: a
flat view; ZeRO-3: an empty placeholder), which is how ZeRO-3 users of other libraries save empty adapters.
:func:`gathered` puts the full parameters back for the duration of a read; it is a collective, so every process
must enter it, and only :func:`is_writer` (rank 0) writes. ``unipelt.save`` does both: under sharding, call it on
every process.

Attach (or ``load``) before sharding, so the deltas are part of the model FSDP wraps; the trainable deltas sit
in the groups of the modules they are attached under, beside frozen base weights (FSDP2 and FSDP1 with
``use_orig_params=True`` take a group with both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    fsdp = _fsdp2_class()
    return [m for m in model.modules() if isinstance(m, fsdp)] if fsdp is not None else []


def _fsdp1_root(model: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)


def _zero3_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed ZeRO-3 holds ``model``'s parameters in shards."""
    return kind(model) is not None


def kind(model: nn.Module) -> str | None:
    """How ``model``'s parameters are sharded: ``"fsdp2"``, ``"fsdp1"``, ``"zero3"``, or None."""
    if _fsdp2_modules(model):
        return "fsdp2"
    if _fsdp1_root(model) is not None:
        return "fsdp1"
    return "zero3" if _zero3_parameters(model) else None


def model_class(model: nn.Module) -> type:
    """``model``'s own class: FSDP2 swaps it for a subclass ``FSDP<Name>`` of ``FSDPModule`` and the class."""
    fsdp = _fsdp2_class()
    return next(c for c in type(model).__mro__ if fsdp is None or not issubclass(c, fsdp))


def is_writer() -> bool:
    """The process that writes files: rank 0 of the default process group, or the only process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece: a ``DTensor`` (what an FSDP2 module's ``state_dict`` gives, even inside
    :func:`gathered`) all-gathered, a collective in the same order on every process; any other as it is."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of ``model`` is whole on every process (FSDP2: each ``FSDPModule`` unsharded;
    FSDP1: ``summon_full_params``; ZeRO-3: ``deepspeed.zero.GatheredParameters``); outside, sharded again.
    A collective: every process of the group must enter it. Without sharding it does nothing.

    The whole model, not only the deltas: some methods' ``delta_state`` reads the base modules it changes (LN
    tuning saves its gains as the difference from the norm's own weight), which sit in other groups. So a save
    under sharding holds the full model on every process for a moment."""
    fsdp2 = _fsdp2_modules(model)
    if fsdp2:
        for module in fsdp2:
            module.unshard()
        try:
            yield
        finally:
            for module in fsdp2:
                module.reshard()
        return
    fsdp1 = _fsdp1_root(model)
    if fsdp1 is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(fsdp1, writeback=False, recurse=True):
            yield
        return
    zero3 = _zero3_parameters(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    yield


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` with FSDP2 over the default process group: each of its transformer layers (as its
    family's row names them) is a group, and the root holds the rest (embeddings, head). Call it after
    attaching and before building the optimizer, on every process, with the model on its device. Returns the
    model (FSDP2 changes it in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .sites import resolve

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in resolve(model).layers:
        fully_shard(layer.module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor of ``param``'s shape as ``param`` is held: for an FSDP2 parameter (a ``DTensor``) this
    process's shard of it, cut locally (every process holds the same whole tensor, so no communication), on the
    parameter's device; any other as it is. The inverse of :func:`whole`."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # a torch without DTensor: nothing is sharded
        return value
    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def load_whole(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (``{parameter name: tensor}``, as read under :func:`whole`) into ``model``'s
    parameters; an FSDP2 parameter takes its own shard of each (:func:`shard_like`)."""
    # FSDP2 leaves the root's group whole after a forward without backward (an evaluation); a copy into that
    # whole tensor would be dropped at its next reshard, so write into the shards
    for module in _fsdp2_modules(model):
        module.reshard()
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"no parameter {unknown[0]!r} in {type(model).__name__}")
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            param.copy_(shard_like(value.to(param.dtype), param))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every state tensor whole (an FSDP2 shard all-gathered: a collective, in
    the same order on every process), so that a checkpoint resumes whatever holds the shards."""
    saved = optimizer.state_dict()
    state = {index: {key: whole(value).to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
                     for key, value in per_param.items()}
             for index, per_param in sorted(saved["state"].items())}
    return {"state": state, "param_groups": saved["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put back :func:`full_optimizer_state`'s state: a whole tensor of an FSDP2 parameter's shape becomes this
    process's shard of it (:func:`shard_like`); the rest (the step count) stays as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, per_param in saved["state"].items():
        param = params[int(index)]
        state[index] = {key: shard_like(value, param)
                        if isinstance(value, torch.Tensor) and value.shape == param.shape else value
                        for key, value in per_param.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

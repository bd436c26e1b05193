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
    return bool(_fsdp2_modules(model) or _fsdp1_root(model) is not None or _zero3_parameters(model))


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

"""The whole state dict of a model sharded by FSDP2 or DeepSpeed ZeRO-3, for saving.

Gathering shards is a collective: every rank must take part, in the same order, or
the job hangs.  :func:`hf_adanorm.save_pretrained` therefore runs its argument
checks inside :func:`agree_before_collective` (a rank whose checks fail makes every
rank raise, before anyone gathers), then :func:`full_state_dict` on every rank; only
the main process writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sharding(model: nn.Module) -> Optional[str]:
    """"fsdp2" when ``fully_shard`` sharded the model (or a part), "zero3" when DeepSpeed
    ZeRO-3 partitioned its parameters, else None (a whole model on each rank)."""
    if not _distributed():
        return None
    from torch.distributed.fsdp import FSDPModule
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        return "fsdp2"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "zero3"
    return None


@contextmanager
def agree_before_collective(sharded: Optional[str]):
    """Run the block; for a sharded model, tell every rank whether any rank's block failed, and
    raise on every rank if one did (the others would otherwise wait in the gather for ever)."""
    if sharded is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, on this rank and the others
        error = err
    failures = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, what) for rank, what in enumerate(failures) if what is not None]
    if failed:
        rank, what = failed[0]
        raise RuntimeError(f"hf_adanorm.save_pretrained failed on rank {rank} ({what}); nothing was saved")


def full_state_dict(model: nn.Module, sharded: str) -> Optional[dict]:
    """The unsharded state dict on CPU on rank 0 (None on the other ranks); all ranks must call it."""
    rank0 = torch.distributed.get_rank() == 0
    if sharded == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if rank0 else None
    import deepspeed
    state = {}
    # one module's parameters at a time, as ZeRO-3 itself does: no rank ever holds the whole model
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=None):
            if rank0:
                own.update((name, buffer) for name, buffer in module.named_buffers(recurse=False)
                           if name not in module._non_persistent_buffers_set)
                state.update((f"{prefix}.{name}" if prefix else name, tensor.detach().cpu().clone())
                             for name, tensor in own.items() if tensor is not None)
    return {name: state[name] for name in model.state_dict()} if rank0 else None

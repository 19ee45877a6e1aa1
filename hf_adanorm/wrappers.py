"""Refuse training wrappers (torch.compile, DDP, FSDP, DeepSpeed, PeftModel) with what to do instead.

Patching through a wrapper would record the wrapper's module names (``_orig_mod.``,
``module.``, ``base_model.model.``), which the inner model's checkpoint does not
have, and would swap modules behind the wrapper's back (DDP and FSDP registered
or sharded the parameters when they were built).  The fix is always the same:
patch the plain model first, then wrap it.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

_ADVICE = {
    "torch.compile": "patch the model before compiling: hf_adanorm.patch_model(model), then "
                     "torch.compile(model). For this wrapper: patch wrapper._orig_mod and compile it again",
    "DistributedDataParallel": "patch the model before wrapping it: hf_adanorm.patch_model(model), then "
                               "DistributedDataParallel(model, ...) (DDP registers the parameters when built)",
    "DataParallel": "patch wrapper.module, then wrap it in DataParallel again",
    "FSDP": "patch the model before sharding it (FullyShardedDataParallel / fully_shard / "
            "accelerator.prepare): sharded parameters cannot be swapped or folded in place",
    "DeepSpeed": "patch the model before deepspeed.initialize (or before Trainer / accelerator.prepare)",
    "PeftModel": "patch the base model before get_peft_model(model, config), or patch "
                 "peft_model.get_base_model(), so the record names the base model's modules",
}


def _kind(module: nn.Module):
    """Which wrapper ``module`` is (a key of _ADVICE), or None."""
    cls = type(module)
    names = {c.__name__ for c in cls.__mro__}
    modules = {c.__module__.split(".")[0] for c in cls.__mro__}
    if "OptimizedModule" in names and hasattr(module, "_orig_mod"):
        return "torch.compile"
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return "DistributedDataParallel"
    if isinstance(module, nn.DataParallel):
        return "DataParallel"
    if names & {"FullyShardedDataParallel", "FSDPModule"}:  # FSDP1, and FSDP2's fully_shard
        return "FSDP"
    if "DeepSpeedEngine" in names:
        return "DeepSpeed"
    if "PeftModel" in names and "peft" in modules:
        return "PeftModel"
    return None


def is_peft_model(model: nn.Module) -> bool:
    return _kind(model) == "PeftModel"


@functools.lru_cache(maxsize=1)
def _unwrap_options() -> dict:
    from accelerate.utils import extract_model_from_parallel
    # accelerate >= 1.2 keeps a torch.compile wrapper unless told not to (before, it always unwrapped)
    supported = "keep_torch_compile" in inspect.signature(extract_model_from_parallel).parameters
    return {"keep_torch_compile": False} if supported else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate / DeepSpeed / torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model, **_unwrap_options())


def inner_model(model: nn.Module) -> nn.Module:
    """The model that was patched, under its own module names: inside torch.compile, DDP and
    accelerate wrappers (patch first, then wrap), then inside a PEFT ``PeftModel``
    (``get_base_model()``); any other model as it is."""
    model = unwrap(model)
    return model.get_base_model() if is_peft_model(model) else model


def refuse_wrappers(model: nn.Module, *, hint_only: bool = False) -> str:
    """Raise ``TypeError`` if ``model`` is, or contains, a wrapper; ``hint_only``: return the advice."""
    found = None
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            found = (name, kind)
            break
    if found is None:
        return ""
    name, kind = found
    where = "the model is" if not name else f"{name!r} is"
    if hint_only:
        return f" ({where} a {kind} wrapper: pass the model inside it)"
    raise TypeError(f"{where} wrapped by {kind}: {_ADVICE[kind]}")

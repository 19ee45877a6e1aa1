"""Refuse training wrappers (torch.compile, DDP, FSDP, DeepSpeed, PeftModel) with what to do instead.

Patching through a wrapper would record the wrapper's module names (``_orig_mod.``,
``module.``, ``base_model.model.``), which the inner model's checkpoint does not
have, and would swap modules behind the wrapper's back (DDP and FSDP registered
or sharded the parameters when they were built).  The fix is always the same:
patch the plain model first, then wrap it.
"""

from __future__ import annotations

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


def peft_base(model: nn.Module) -> nn.Module:
    """The model a PEFT ``PeftModel`` wraps (``get_base_model()``: the model that was patched, under its
    own module names); any other model as it is. ``torch.compile`` and DDP wrappers (patch first, then
    wrap) are looked through first, as accelerate's ``extract_model_from_parallel`` does."""
    from accelerate.utils import extract_model_from_parallel
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if _kind(model) == "PeftModel" else model


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

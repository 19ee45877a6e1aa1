"""``patch_model`` / ``unpatch_model``: swap a model's LayerNorms in place, reversibly.

The patcher plans everything first (detect, filter, build the replacements) and
only then mutates the model, so any error leaves the model as it was.  Original
modules are kept, unregistered, in ``model._hf_adanorm_originals`` (their gain
and bias are neither trained nor saved while patched) and come back, the very
same objects, with :func:`unpatch_model`.  A JSON record of the patch is put on
``model.config.hf_adanorm`` (when the model has a config) for saving, loading and
callbacks.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Union

from torch import nn

from .config import NormConfig
from .detect import HOOK_DICTS, NormInfo, classify, one_thread
from .norms import _ParameterFreeNorm
from .fold import apply_fold, fold_summary, plan_fold, unfold
from .registry import build_norm, get_spec
from .report import ModuleEntry, PatchReport

RECORD_VERSION = 1
_RECORD_ATTR = "_hf_adanorm_record"
_ORIGINALS_ATTR = "_hf_adanorm_originals"
_CONFIG_KEY = "hf_adanorm"


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _RECORD_ATTR, None) is not None


def get_patch_record(model: nn.Module) -> Optional[dict]:
    """The JSON-serializable record of the patch on ``model`` (None if unpatched)."""
    return getattr(model, _RECORD_ATTR, None)


def _affine_note(module: nn.Module, info: NormInfo) -> str:
    """How far the dropped gain and bias are from the identity (the function change)."""
    parts = []
    for pname, neutral, label in ((info.gain, 1.0 - info.gain_offset, "gain"), (info.bias, 0.0, "bias")):
        p = getattr(module, pname) if pname else None
        if p is None:
            continue
        if p.is_meta:
            parts.append(f"drops {label}")
            continue
        gap = (p.detach().float() - neutral).abs().max().item()
        if gap > 0:
            parts.append(f"drops {label} (max |{label} - {neutral:g}| = {gap:.3g})")
    return "; ".join(parts) or "gain and bias are the identity: nothing dropped"


def _plan(model, config: NormConfig, filter_fn) -> tuple[list[ModuleEntry], dict]:
    """Classify every module; return report entries and {name: (info, module)} to replace."""
    entries, chosen = [], {}
    # Every name of a shared module, so that no alias keeps the original norm unseen.
    with one_thread():
        classified = [(name, module, *classify(module))
                      for name, module in model.named_modules(remove_duplicate=False)]
    for name, module, info, reason in classified:
        if info is None:
            if reason:
                entries.append(ModuleEntry(name, type(module).__name__, None, "skipped", reason))
            continue
        why_not = None
        if name == "":
            why_not = "the model itself is a norm: wrap it in a container to patch it"
        elif isinstance(module, _ParameterFreeNorm):
            why_not = "already an hf_adanorm norm (this model or a part of it was patched before)"
        elif info.kind == "rmsnorm" and not config.include_rmsnorm:
            why_not = "RMSNorm (pass include_rmsnorm=True to replace it with the RMS counterpart)"
        elif config.include is not None and not _matches(name, config.include):
            why_not = "not matched by include"
        elif config.exclude is not None and _matches(name, config.exclude):
            why_not = "matched by exclude"
        elif filter_fn is not None and not filter_fn(module, name):
            why_not = "rejected by filter_fn"
        if why_not:
            entries.append(ModuleEntry(name, type(module).__name__, info.kind, "skipped", why_not))
        else:
            entries.append(ModuleEntry(name, type(module).__name__, info.kind, "replaced",
                                       _affine_note(module, info)))
            chosen[name] = (info, module)
    return entries, chosen


def _nothing_matched(entries, config) -> ValueError:
    norms_seen = [e for e in entries if e.kind]
    if not norms_seen:
        msg = "found no LayerNorm-like module in the model"
        if entries:
            msg += " (norm-like modules seen but left alone: " + ", ".join(
                f"{e.name} [{e.class_name}: {e.reason}]" for e in entries[:5]) + ")"
        return ValueError(msg + "; nothing to patch")
    by_reason = {}
    for e in norms_seen:
        by_reason.setdefault(f"{e.kind}: {e.reason}", []).append(e.name)
    listing = "; ".join(f"{', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"
                        f" ({why})" for why, names in by_reason.items())
    more = ""
    hint = ""
    if all(e.kind == "rmsnorm" for e in norms_seen) and not config.include_rmsnorm:
        hint = " This model uses RMSNorm: pass include_rmsnorm=True."
    return ValueError(f"no module matched: found {listing}{more}.{hint}")


def _copy_hooks(old: nn.Module, new: nn.Module) -> None:
    """Carry torch hooks and accelerate's dispatch hook over to the replacement.

    The torch hook dicts are shared, not copied, so the handles the caller holds
    still remove a hook, whether the original or the replacement is in place.
    """
    for attr in HOOK_DICTS:
        if attr in old.__dict__:
            object.__setattr__(new, attr, getattr(old, attr))
    # Without this flag torch silently ignores the carried (full) backward hooks.
    new._is_full_backward_hook = old._is_full_backward_hook
    hf_hook = getattr(old, "_hf_hook", None)
    if hf_hook is not None:
        from accelerate.hooks import add_hook_to_module  # imported by _check_can_install already
        add_hook_to_module(new, hf_hook)


def _swap_in(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def _build_replacements(config: NormConfig, chosen: dict) -> dict:
    built, by_original = {}, {}
    for name, (info, module) in chosen.items():
        if id(module) not in by_original:  # one replacement per module: aliases stay tied
            eps = config.eps if config.eps is not None else info.eps
            new = build_norm(config, info.kind, (info.size,), eps)
            new.train(module.training)
            by_original[id(module)] = new
        built[name] = by_original[id(module)]
    return built


def _install(model, config: NormConfig, chosen: dict, built: dict) -> dict:
    originals = {}
    for name, new in built.items():
        _copy_hooks(chosen[name][1], new)
        originals[name] = _swap_in(model, name, new)
    record = {
        "format_version": RECORD_VERSION,
        "config": config.to_dict(),
        "modules": {name: {"kind": info.kind, "size": info.size, "eps": info.eps,
                           "original_class": type(module).__name__, "gain": info.gain,
                           "gain_offset": info.gain_offset, "bias": info.bias}
                    for name, (info, module) in chosen.items()},
    }
    from . import __version__
    record["library_version"] = __version__
    object.__setattr__(model, _ORIGINALS_ATTR, originals)
    object.__setattr__(model, _RECORD_ATTR, record)
    if getattr(model, "config", None) is not None:
        setattr(model.config, _CONFIG_KEY, record)
    from .checkpoint import attach_save_pretrained  # lazy: checkpoint imports this module
    attach_save_pretrained(model)  # model.save_pretrained writes what hf_adanorm.save_pretrained does
    return record


def _check_can_install(model: nn.Module, chosen: dict) -> None:
    """Refuse what would leave a mixed state, and import what installing needs, before any change."""
    patched_parts = [name for name, module in model.named_modules()
                     if isinstance(module, _ParameterFreeNorm) or (name and is_patched(module))]
    if patched_parts:
        raise RuntimeError(f"part of this model is already patched ({', '.join(patched_parts[:3])}"
                           f"{' ...' if len(patched_parts) > 3 else ''}); unpatch that part "
                           "(hf_adanorm.unpatch_model on the module you patched) first")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, _CONFIG_KEY, None) is not None:
        raise RuntimeError(
            "model.config already carries an hf_adanorm record but this model is not patched: it "
            "was loaded without hf_adanorm.from_pretrained, or another module sharing this config "
            "is patched. Load it with hf_adanorm.from_pretrained, or unpatch the other module first")
    from .checkpoint import attach_save_pretrained  # noqa: F401 - fail here, not half-way
    if any(getattr(module, "_hf_hook", None) is not None for _, module in chosen.values()):
        import accelerate.hooks  # noqa: F401


def patch_model(
    model: nn.Module,
    norm: Union[str, NormConfig] = "adanorm",
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    dry_run: bool = False,
    **options,
) -> PatchReport:
    """Replace ``model``'s LayerNorms in place with ``norm``; return a :class:`PatchReport`.

    ``norm`` is a registered name (``hf_adanorm.available_norms()``) or a
    :class:`NormConfig`; ``options`` are NormConfig fields (``k``, ``C``,
    ``detach``, ``eps``, ``eps_mode``, ``include_rmsnorm``, ``include``,
    ``exclude``).  ``filter_fn(module, name) -> bool`` vetoes single modules.
    With ``dry_run=True`` nothing changes.  Raises ``ValueError`` when nothing
    matches and ``RuntimeError`` on an already patched model; on any error the
    model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module, got {type(model).__name__}")
    config = NormConfig.from_options(norm, options)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}")
    if is_patched(model):
        done = get_patch_record(model)["config"]["norm"]
        raise RuntimeError(f"model is already patched with {done!r}; call "
                           "hf_adanorm.unpatch_model(model) before patching again")
    entries, chosen = _plan(model, config, filter_fn)
    if not chosen:
        raise _nothing_matched(entries, config)
    report = PatchReport(config.norm, entries, dry_run, get_spec(config.norm).effect)
    built = _build_replacements(config, chosen)
    for entry in report.replaced:
        entry.replacement = type(built[entry.name]).__name__
        if dry_run:
            entry.action = "would replace"
    folding = plan_fold(model, chosen, built) if config.fold_affine else None  # changes nothing
    if not dry_run:
        _check_can_install(model, chosen)
        folded = apply_fold(model, folding) if folding is not None else None  # after all checks
        record = _install(model, config, chosen, built)
        if folding is not None:
            record["fold"] = fold_summary(model, folding, report, folded)
    elif folding is not None:
        fold_summary(model, folding, report)
    return report


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original norm modules (same objects, same parameters) back; returns ``model``."""
    if not is_patched(model):
        raise ValueError("model is not patched by hf_adanorm; nothing to undo")
    originals = getattr(model, _ORIGINALS_ATTR, None)
    if originals is None:
        raise ValueError("this model was rebuilt from a patch record (e.g. loaded from a "
                         "checkpoint) and holds no original norms to restore")
    unfold(model)  # folded Linear layers back first: it raises, changing nothing, if they were trained
    for name, original in originals.items():
        _swap_in(model, name, original)
    object.__setattr__(model, _ORIGINALS_ATTR, None)
    object.__setattr__(model, _RECORD_ATTR, None)
    model.__dict__.pop("save_pretrained", None)  # the class's own save_pretrained again
    if getattr(model, "config", None) is not None and hasattr(model.config, _CONFIG_KEY):
        delattr(model.config, _CONFIG_KEY)
    return model

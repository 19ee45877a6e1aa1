"""``patch_model`` / ``unpatch_model``: swap a model's LayerNorms in place, reversibly.

The patcher plans everything first (detect, filter, build the replacements, plan
the fold), then changes the model as one transaction: every change logs its
inverse, and any error (an out-of-memory in a fold, an interrupt) undoes what was
done, so the model, its modules and its config are left exactly as they were.

Where the patch state lives (see :mod:`.record`): the record and the original
modules sit in a :class:`~.record.PatchState` in the model's ``__dict__`` (copied
by ``copy.deepcopy`` and pickle, invisible to ``parameters()``, ``state_dict()``
and optimizers).  Each original's tensors are also kept as non-persistent buffers
of its replacement (``hf_adanorm_original__<name>``), aliasing them: those follow
``.to()``, ``.half()``, device moves and DDP's buffer sync, so ``unpatch_model``
puts the originals back converted exactly as the rest of the model was.  Nothing
is written into ``model.config``, which may be shared with another model.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Optional, Union

from torch import nn

from .checkpoint import attach_save_pretrained, detach_save_pretrained
from .config import NormConfig
from .detect import HOOK_DICTS, NormInfo, classify, one_thread
from .fold import fold_summary, plan_fold
from .fold_state import apply_fold, converted, unfold
from .norms import _ParameterFreeNorm, check_eps
from .record import (CONFIG_KEY, PatchState, build_record, clear_state, get_record, get_state,
                     set_state, swap_module)
from .registry import build_norm, get_spec, keep_output_dtype, warn_output_dtype
from .report import ModuleEntry, PatchReport
from .wrappers import is_peft_model, inner_model, refuse_wrappers

_ORIGINAL_PREFIX = "hf_adanorm_original__"


def get_patch_record(model: nn.Module) -> Optional[dict]:
    """The JSON-serializable record of the patch on ``model`` (None if unpatched). For a PEFT
    ``PeftModel`` (patched first, then ``get_peft_model``), the record of the model inside it, whose
    module names (``bert.encoder...``, not ``base_model.model.bert.encoder...``) it holds."""
    return get_record(inner_model(model))


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` holds a patch of :func:`patch_model` (or was loaded with one); for a PEFT
    ``PeftModel``, whether the model inside it does (``unpatch_model`` takes that model)."""
    return get_patch_record(model) is not None


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


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


def _check_exclude_matched(entries, config) -> None:
    """An exclude pattern that matches no norm is almost always a misspelt name (or a search pattern
    where a full-name regular expression is expected): the norm meant to stay would be replaced
    unnoticed. Each pattern of a list is checked on its own, so one typo among several is caught."""
    if config.exclude is None:
        return
    norms = [e.name for e in entries if e.kind]
    # (shown, as _matches takes it): a string is one regular expression; a list, names one by one
    patterns = ([(config.exclude, config.exclude)] if isinstance(config.exclude, str)
                else [(p, [p]) for p in config.exclude])
    unmatched = [shown for shown, pattern in patterns if not any(_matches(name, pattern) for name in norms)]
    if not unmatched:
        return
    how = ("a regular expression that must match a module's full name (e.g. '.*embeddings.*')"
           if isinstance(config.exclude, str) else "module names, or their last parts (e.g. 'LayerNorm')")
    raise ValueError(f"exclude={config.exclude!r}: {', '.join(map(repr, unmatched))} matched no norm, so it "
                     f"would keep none; patterns are {how}. The norms are named: "
                     f"{', '.join(norms[:6])}{' ...' if len(norms) > 6 else ''}")


def _roll_back(undo: list, err: BaseException) -> None:
    """Undo every step taken, newest first. A step that fails does not stop the others (each undoes a
    change of its own) and does not hide ``err``: it is told in a note on it."""
    for step in reversed(undo):
        try:
            step()
        except Exception as failed:  # plain assignments, unlikely to fail: but never hide err
            message = (f"hf_adanorm: undoing a step failed too ({type(failed).__name__}: {failed}); the model may "
                       "be left partly changed: reload it")
            if hasattr(err, "add_note"):
                err.add_note(message)
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=3)


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
        from accelerate.hooks import add_hook_to_module  # imported by _install already
        add_hook_to_module(new, hf_hook)


def _build_replacements(config: NormConfig, chosen: dict) -> dict:
    built, by_original, unfollowed = {}, {}, {}
    for name, (info, module) in chosen.items():
        if id(module) not in by_original:  # one replacement per module: aliases stay tied
            eps = config.eps if config.eps is not None else info.eps
            try:
                check_eps(eps)
            except ValueError:
                raise ValueError(f"{name} ({type(module).__name__}) has eps={eps!r}, and its "
                                 "replacement needs a finite eps > 0: pass eps=... to patch_model, "
                                 "or exclude this module") from None
            new = build_norm(config, info.kind, (info.size,), eps)
            if not keep_output_dtype(new, module, info):
                unfollowed[name] = new
            new.train(module.training)
            by_original[id(module)] = new
        built[name] = by_original[id(module)]
    warn_output_dtype(unfollowed, stacklevel=4)  # the caller of patch_model
    return built


def _own_tensors(module: nn.Module):
    yield from ((n, t) for n, t in module._parameters.items() if t is not None)
    yield from ((n, t) for n, t in module._buffers.items() if t is not None)


def _keep_original_tensors(new: nn.Module, original: nn.Module) -> None:
    """Alias the original's tensors as non-persistent buffers of ``new``: they follow the model."""
    for pname, tensor in _own_tensors(original):
        new.register_buffer(_ORIGINAL_PREFIX + pname, tensor.detach(), persistent=False)


def _restore_original_tensors(new: nn.Module, original: nn.Module, undo: list) -> None:
    """Give the original the tensors its aliases became after the model's moves (same objects);
    ``undo`` gets the inverse of each change."""
    for pname, tensor in list(_own_tensors(original)):
        key = _ORIGINAL_PREFIX + pname
        moved = new._buffers.pop(key)
        undo.append(lambda key=key, moved=moved: new._buffers.__setitem__(key, moved))
        unmoved = (moved.dtype == tensor.dtype and moved.device == tensor.device
                   and (moved.is_meta or moved.data_ptr() == tensor.data_ptr()))
        if unmoved:
            continue
        where = original._parameters if pname in original._parameters else original._buffers
        undo.append(lambda where=where, pname=pname, tensor=tensor, data=tensor.data: (
            setattr(tensor, "data", data), where.__setitem__(pname, tensor)))
        if where is original._parameters:  # the same Parameter object where torch allows it
            original._parameters[pname] = converted(tensor, moved)
        else:
            original._buffers[pname] = moved


def _holds_original(current: nn.Module, original: nn.Module) -> bool:
    return all(_ORIGINAL_PREFIX + n in current._buffers for n, _ in _own_tensors(original))


def _check_can_install(model: nn.Module) -> None:
    """Refuse what would leave a mixed state, before any change."""
    patched_parts = [name for name, module in model.named_modules()
                     if isinstance(module, _ParameterFreeNorm) or (name and is_patched(module))]
    if patched_parts:
        raise RuntimeError(f"part of this model is already patched ({', '.join(patched_parts[:3])}"
                           f"{' ...' if len(patched_parts) > 3 else ''}); unpatch that part "
                           "(hf_adanorm.unpatch_model on the module you patched) first")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, CONFIG_KEY, None) is not None:
        raise RuntimeError(
            "model.config carries an hf_adanorm record but this model is not patched: it was "
            "loaded from an hf_adanorm checkpoint without hf_adanorm.from_pretrained. Load it with "
            "hf_adanorm.from_pretrained(AutoModel..., path) instead")


def _install(model, config: NormConfig, chosen: dict, built: dict, folding, report) -> None:
    """Fold, swap, record: one transaction (any error undoes every step already taken)."""
    if any(getattr(module, "_hf_hook", None) is not None for _, module in chosen.values()):
        import accelerate.hooks  # noqa: F401 - fail here, not half-way
    undo = []
    try:
        fold_state = (apply_fold(model, folding, built, undo, config.exact_unfold)
                      if folding is not None else None)
        prepared, originals = set(), {}
        for name, new in built.items():
            original = chosen[name][1]
            if id(new) not in prepared:  # aliases share one replacement
                prepared.add(id(new))
                _copy_hooks(original, new)
                _keep_original_tensors(new, original)
            swap_module(model, name, new)
            undo.append(lambda name=name, original=original: swap_module(model, name, original))
            originals[name] = original
        record = build_record(config, chosen)
        if folding is not None:
            record["fold"] = fold_summary(model, folding, report, fold_state)
        set_state(model, PatchState(record, originals, fold_state))
        undo.append(lambda: clear_state(model))
        attach_save_pretrained(model)  # model.save_pretrained writes what hf_adanorm.save_pretrained does
        undo.append(lambda: detach_save_pretrained(model))
    except BaseException as err:
        _roll_back(undo, err)
        raise


def _check_rms_detach(config: NormConfig, chosen: dict) -> None:
    if "detach" in get_spec(config.norm).options and config.detach == "mean":
        rms = [name for name, (info, _) in chosen.items() if info.kind == "rmsnorm"]
        if rms:
            raise ValueError(f"detach='mean' does nothing on RMSNorm modules ({', '.join(rms[:3])}"
                             f"{' ...' if len(rms) > 3 else ''}): they subtract no mean. Use "
                             "detach='variance' or 'both', or exclude them")


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
    ``exclude``, ``fold_affine``, ``exact_unfold``); an option the norm does not
    use is refused.  ``filter_fn(module, name) -> bool`` vetoes single modules.
    With ``dry_run=True`` nothing changes.  Raises ``ValueError`` when nothing
    matches, ``RuntimeError`` on an already patched model, ``TypeError`` for a
    wrapper (torch.compile, DDP, FSDP, PeftModel: patch the model inside first);
    on any error the model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module, got {type(model).__name__}")
    config = NormConfig.from_options(norm, options)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {filter_fn!r}")
    refuse_wrappers(model)
    if is_patched(model):
        done = get_record(model)["config"]["norm"]
        raise RuntimeError(f"model is already patched with {done!r}; call "
                           "hf_adanorm.unpatch_model(model) before patching again")
    entries, chosen = _plan(model, config, filter_fn)
    if not chosen:
        raise _nothing_matched(entries, config)
    _check_exclude_matched(entries, config)
    warning = config.saturation_warning(max(info.size for info, _ in chosen.values()))
    if warning:
        warnings.warn(warning, UserWarning, stacklevel=2)
    _check_rms_detach(config, chosen)
    report = PatchReport(config.norm, entries, dry_run, get_spec(config.norm).effect)
    built = _build_replacements(config, chosen)
    for entry in report.replaced:
        entry.replacement = type(built[entry.name]).__name__
        if dry_run:
            entry.action = "would replace"
    folding = plan_fold(model, chosen, built) if config.fold_affine else None  # changes nothing
    if not dry_run:
        _check_can_install(model)
        _install(model, config, chosen, built, folding, report)
    elif folding is not None:
        fold_summary(model, folding, report)
    return report


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original norm modules (same objects, same parameters) back; returns ``model``.

    The originals come back in the model's current dtype and device (converted
    exactly as the model was since patching).  Everything is checked before the
    first change; a refusal leaves the model patched and unchanged, and so does an
    error while restoring (every change already made is undone before it propagates).
    """
    state = get_state(model)
    if state is None and is_patched(model) and is_peft_model(model):  # a PeftModel around a patched model
        raise ValueError("the model is a PEFT PeftModel around a patched model: unpatch the model inside it, "
                         "hf_adanorm.unpatch_model(peft_model.get_base_model()) (the adapters stay), or the "
                         "model that peft_model.merge_and_unload() or peft_model.unload() returns")
    if state is None:
        raise ValueError("model is not patched by hf_adanorm; nothing to undo"
                         + refuse_wrappers(model, hint_only=True))
    if state.originals is None:
        raise ValueError("this model was rebuilt from a patch record (e.g. loaded from a "
                         "checkpoint) and holds no original norms to restore")
    if state.extra.get("rescaled"):
        raise ValueError(f"the Linear layers around {len(state.extra['rescaled'])} of this model's norms were "
                         "rescaled when they were swapped (GradualSwapCallback(rescale_probe=...)), and putting the "
                         "norms back would not undo that: load the original model again instead")
    current = {}
    for name, original in state.originals.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not _holds_original(module, original):
            raise RuntimeError(f"cannot unpatch: {name!r} no longer holds the norm hf_adanorm put "
                               "there (it was replaced or removed since patch_model)")
        current[name] = module
    fold_steps = unfold(model, state.fold) if state.fold is not None else []  # raises, changing nothing
    undo = []  # as in _install: any error (an interrupt) undoes every step already taken
    try:
        for step in fold_steps:
            step(undo)
        restored = set()
        for name, original in state.originals.items():
            if id(original) not in restored:
                restored.add(id(original))
                _restore_original_tensors(current[name], original, undo)
                undo.append(lambda original=original, modes=[m.training for m in original.modules()]: [
                    m.train(mode) for m, mode in zip(original.modules(), modes)])
                original.train(current[name].training)
            swap_module(model, name, original)
            undo.append(lambda name=name: swap_module(model, name, current[name]))
        for module in current.values():  # the replacements keep no reference to the originals
            for key in [k for k in module._buffers if k.startswith(_ORIGINAL_PREFIX)]:
                undo.append(lambda module=module, key=key, kept=module._buffers[key]:
                            module._buffers.__setitem__(key, kept))
                del module._buffers[key]
        clear_state(model)
        undo.append(lambda: set_state(model, state))
        saver = model.__dict__.get("save_pretrained")
        detach_save_pretrained(model)  # the class's own save_pretrained again
        undo.append(lambda: model.__dict__.__setitem__("save_pretrained", saver) if saver is not None else None)
    except BaseException as err:
        _roll_back(undo, err)
        raise
    return model

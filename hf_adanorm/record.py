"""The patch record and the patch state: built, stored, read and validated here, and only here.

Both :mod:`.patch` (which writes them) and :mod:`.checkpoint` (which saves and
loads them) import this module; neither imports the other's internals.

The record
----------
A JSON-serializable dict describing one patch::

    {"format_version": 1, "library_version": "0.1.0",
     "config": NormConfig.to_dict(),
     "modules": {name: {"kind", "size", "eps", "original_class", "gain", "gain_offset", "bias"}},
     "fold": {...}}                                  # only with fold_affine=True

:func:`build_record` makes it, :func:`check_record` validates one read from a file
(raising :class:`CheckpointError` naming the bad field), :func:`get_record`
returns the one on a model.

One source of truth
-------------------
In memory the record lives only on the patched model, inside its
:class:`PatchState`.  It is *not* written into ``model.config``: a config object
is often shared by several models (a baseline and a patched copy), and a record
there would leak into the other one.  ``save_pretrained`` writes it into the
saved ``config.json`` under :data:`CONFIG_KEY`; loading reads it back from there
(:func:`record_from_config`) and removes it from the loaded config object.

The state
---------
:class:`PatchState` holds the record and what ``unpatch_model`` needs (the
original modules, the fold undo data).  It is a plain Python object in the
model's ``__dict__``, not a submodule: it never shows in ``named_modules()``,
``parameters()`` or ``state_dict()``, and never changes what an
``nn.Sequential`` runs.  ``copy.deepcopy`` and pickle copy it with the model.
Tensors that must follow ``.to()`` / ``.half()`` are kept elsewhere, as
non-persistent buffers of the replacement norms (see :mod:`.patch`).

API
---
``RECORD_VERSION``, ``CONFIG_KEY``, ``CheckpointError``,
``build_record(config, chosen)``, ``check_record(record) -> NormConfig``,
``record_from_config(config)``, ``PatchState``, ``get_state(model)``,
``get_record(model)``, ``is_patched(model)``, ``set_state(model, state)``,
``clear_state(model)``, ``swap_module(model, name, new) -> old``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from . import portable
from .config import NormConfig
from .portable import RECORD_VERSION, CheckpointError  # noqa: F401 - the remote code carries them too
from .registry import available_norms

CONFIG_KEY = "hf_adanorm"  # the record's key in a saved config.json
_STATE_ATTR = "_hf_adanorm_state"  # the PatchState's key in a patched model's __dict__


@dataclass
class PatchState:
    """Everything hf_adanorm keeps on a patched model (see the module docstring)."""

    record: dict
    originals: Optional[dict] = None  # {module name: original module}; None when rebuilt from a record
    fold: Any = None  # fold.FoldState when fold_affine folded something
    extra: dict = field(default_factory=dict)  # {what: undo data} for other reversible changes


def get_state(model: nn.Module) -> Optional[PatchState]:
    return model.__dict__.get(_STATE_ATTR)


def get_record(model: nn.Module) -> Optional[dict]:
    """The JSON-serializable record of the patch on ``model`` (None if unpatched)."""
    state = get_state(model)
    return None if state is None else state.record


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` holds a patch of :func:`hf_adanorm.patch_model` (or was loaded with one), which
    :func:`hf_adanorm.unpatch_model` would undo."""
    return get_state(model) is not None


def set_state(model: nn.Module, state: PatchState) -> None:
    # object.__setattr__: nn.Module.__setattr__ would be fine for a plain object too, but this
    # keeps the state out of any Module bookkeeping whatever type it is given.
    object.__setattr__(model, _STATE_ATTR, state)


def clear_state(model: nn.Module) -> None:
    model.__dict__.pop(_STATE_ATTR, None)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` inside ``model``; returns the module that was there."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def build_record(config: NormConfig, chosen: dict) -> dict:
    """The record of patching ``chosen`` ({name: (NormInfo, module)}) with ``config``."""
    from . import __version__
    return {
        "format_version": RECORD_VERSION,
        "config": config.to_dict(),
        "modules": {name: {"kind": info.kind, "size": info.size, "eps": info.eps,
                           "original_class": type(module).__name__, "gain": info.gain,
                           "gain_offset": info.gain_offset, "bias": info.bias}
                    for name, (info, module) in chosen.items()},
        "library_version": __version__,
    }


def record_from_config(config) -> Optional[dict]:
    """The raw (unvalidated) record carried by a loaded transformers config, or None."""
    return getattr(config, CONFIG_KEY, None) if config is not None else None


def check_record(record) -> NormConfig:
    """Validate a patch record read from config.json; returns its :class:`NormConfig`.

    The checks of :func:`portable.check_record` (the generated remote code runs the same ones),
    with the norms this hf_adanorm knows, registered ones included, then NormConfig's own.
    Raises :class:`CheckpointError` naming the bad field.
    """
    options = portable.check_record(record, norms=available_norms())
    try:
        return NormConfig.from_dict(options)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the hf_adanorm record in config.json is corrupted: config has invalid "
                              f"options ({err}); re-save the model with hf_adanorm.save_pretrained") from None

"""Save, load and share patched models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A folder written by :func:`save_pretrained` holds

* ``model.safetensors``: the weights (the replaced norms have none);
* ``config.json``: the model's config plus ``hf_adanorm``, the versioned patch
  record (norm and options, every replaced module's kind, size and eps, and what
  ``fold_affine`` did), and an ``auto_map`` to the remote code;
* ``modeling_hf_adanorm.py``: self-contained remote code (see :mod:`.remote_code`);
* ``README.md``: a model card.

:func:`from_pretrained` validates the record, then builds the model through a
subclass whose ``__init__`` re-applies the patch *before* transformers loads the
weights, so no key is missing or unexpected.  With ``plain=True`` a
LayerNorm-simple model is written as a stock checkpoint instead (gain 1, bias 0
in the ordinary norm slots) that loads with transformers alone.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import NormConfig
from .record import (CONFIG_KEY, RECORD_VERSION, CheckpointError, PatchState, check_record,
                     get_record, record_from_config, set_state, swap_module)
from .registry import build_norm
from .remote_code import MODELING_FILE, auto_map, base_model_class, modeling_source

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def rebuild_patch(model: nn.Module, record: dict) -> None:
    """Apply a saved patch to a freshly built (unpatched) ``model``; checks everything first."""
    config = check_record(record)
    def module(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the hf_adanorm record names module {name!r}, which "
                                  f"{type(model).__name__} does not have; load the checkpoint with "
                                  "the model class it was saved from") from None

    swaps = []
    for name, entry in record["modules"].items():
        eps = config.eps if config.eps is not None else entry["eps"]
        swaps.append((name, module(name), build_norm(config, entry["kind"], (entry["size"],), eps)))
    layers = [module(n) for n in (record.get("fold") or {}).get("added_bias", [])]
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        raise CheckpointError("the hf_adanorm record's fold.added_bias names a layer that is not "
                              "an nn.Linear: the record is corrupted")
    for name, old, new in swaps:
        new.train(old.training)
        swap_module(model, name, new)
    for layer in layers:  # folding gave these a bias; the checkpoint holds its values
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    set_state(model, PatchState(record))  # no originals: unpatch_model refuses
    # The record lives on the model only (see record.py): the loaded config object forgets it.
    if getattr(model, "config", None) is not None and hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    attach_save_pretrained(model)


_PATCHED_CLASSES: dict = {}


def _patched_class(base: type) -> type:
    """``base`` whose ``__init__`` re-applies ``config.hf_adanorm`` (before weights load)."""
    if base not in _PATCHED_CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            rebuild_patch(self, record_from_config(config))
        _PATCHED_CLASSES[base] = type(base.__name__, (base,), {
            "__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__})
    return _PATCHED_CLASSES[base]


def _resolve_class(model_class, config) -> type:
    from transformers import PreTrainedModel
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        raise TypeError(f"model_class must be a transformers model or AutoModel class, got {model_class!r}")
    if type(config) not in mapping:
        raise ValueError(f"{model_class.__name__} cannot build a model from {type(config).__name__}")
    return mapping[type(config)]


def from_pretrained(model_class, pretrained_model_name_or_path, *model_args, **kwargs):
    """Load a checkpoint written by :func:`save_pretrained`, patch included.

    ``model_class`` is an Auto class (``AutoModelForCausalLM``) or a concrete
    transformers class; ``kwargs`` go to its ``from_pretrained`` (``dtype``,
    ``device_map`` ...).  Weights are read from safetensors only.  Raises
    :class:`CheckpointError` (nothing loaded) for a record that is missing, newer
    than this hf_adanorm, corrupted or names an unknown norm.
    """
    from transformers import AutoConfig
    if kwargs.get("use_safetensors") is False:
        raise ValueError("hf_adanorm loads weights from safetensors only (no pickle)")
    kwargs["use_safetensors"] = True
    config = kwargs.pop("config", None)
    if config is not None:
        config = copy.deepcopy(config)  # loading moves the record from the config to the model
    else:
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    record = record_from_config(config)
    if record is None:
        raise CheckpointError(f"{pretrained_model_name_or_path} has no hf_adanorm record in its "
                              "config.json: it is not a patched checkpoint; load it with transformers")
    check_record(record)
    base = _resolve_class(model_class, config)
    loaded = _patched_class(base).from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  config=config, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
    model.__class__ = base  # the subclass only adds __init__: hand back a plain transformers object
    return loaded


def _unwrap(model) -> nn.Module:
    """The model inside DDP / accelerate / torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model)


def _is_main_process() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _plain_state_dict(model, record, config: NormConfig, state_dict) -> dict:
    """The state dict of the stock model computing the same: every norm gain 1, bias 0."""
    problems = []
    if config.norm not in ("layernorm_simple", "detachnorm") or config.eps_mode != "torch":
        problems.append(f"norm {config.norm!r} with eps_mode {config.eps_mode!r} is not a stock "
                        "norm with gain 1 and bias 0 (only layernorm_simple/detachnorm, eps_mode 'torch')")
    modules = record["modules"]
    if config.eps is not None and any(e["eps"] != config.eps for e in modules.values()):
        problems.append("eps was overridden, and stock norms use their config's eps")
    added = (record.get("fold") or {}).get("added_bias", [])
    if added:
        problems.append(f"folding gave {', '.join(added)} a bias the stock class does not have")
    if any("gain" not in e for e in modules.values()):
        problems.append("the record lacks the original norms' parameter names")
    if problems:
        raise ValueError("plain=True needs a model the stock architecture computes exactly: "
                         + "; ".join(problems) + ". Save without plain=True (remote code) instead.")
    state = dict(model.state_dict() if state_dict is None else state_dict)
    dtype = next(model.parameters()).dtype
    for name, entry in modules.items():
        if entry["gain"]:
            state[f"{name}.{entry['gain']}"] = torch.full((entry["size"],), 1.0 - entry["gain_offset"], dtype=dtype)
        if entry.get("bias"):
            state[f"{name}.{entry['bias']}"] = torch.zeros(entry["size"], dtype=dtype)
    return state


def _write_config(config, save_directory: Path, *, record: Optional[dict],
                  remote: Optional[dict]) -> None:
    """Rewrite config.json: the record (None for a plain checkpoint), ``auto_map`` for remote code."""
    config = copy.deepcopy(config)
    if record is not None:
        setattr(config, CONFIG_KEY, record)
    elif hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    # entries pointing at our remote code (kept from a folder this model was loaded from) go:
    # without the file they would break trust_remote_code loading
    ours = f"{MODELING_FILE[:-3]}."
    kept = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items()
            if not (isinstance(v, str) and v.startswith(ours))}
    if remote is not None:
        kept.update(remote)
    if kept:
        config.auto_map = kept
    elif hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    config.to_json_file(save_directory / "config.json", use_diff=True)


def save_pretrained(model, save_directory, *, remote_code: bool = True, plain: bool = False,
                    base_model: Optional[str] = None, metrics: Optional[dict] = None,
                    is_main_process: Optional[bool] = None, **kwargs) -> Optional[Path]:
    """Save a patched model so that it loads again, with or without hf_adanorm.

    Writes safetensors weights and config.json with the patch record, plus (when
    ``remote_code``) ``modeling_hf_adanorm.py`` and ``auto_map`` for
    ``AutoModelFor...from_pretrained(dir, trust_remote_code=True)``, and a model
    card (``base_model``: the hub id of the original model; ``metrics``: a dict of
    results to list).  ``plain=True`` writes a stock checkpoint instead (see module
    docstring).  DDP/accelerate wrappers are unwrapped; only the main process
    writes (others return None).  ``kwargs`` go to transformers' ``save_pretrained``.
    """
    from .card import model_card
    model = _unwrap(model)
    record = get_record(model)
    if record is None:
        raise ValueError("the model is not patched by hf_adanorm; use model.save_pretrained")
    config = check_record(record)
    if kwargs.pop("safe_serialization", True) is False or kwargs.get("push_to_hub"):
        raise ValueError("hf_adanorm saves safetensors only, and pushes with hf_adanorm.push_to_hub")
    state_dict = kwargs.pop("state_dict", None)
    if plain:
        state_dict = _plain_state_dict(model, record, config, state_dict)
    remote = auto_map(model) if remote_code and not plain else None  # raises before writing
    if is_main_process is None:
        is_main_process = _is_main_process()
    if not is_main_process:
        return None
    save_directory = Path(save_directory)
    type(model).save_pretrained(model, save_directory, state_dict=state_dict, **kwargs)
    _write_config(model.config, save_directory, record=None if plain else record, remote=remote)
    if remote is not None:
        source = modeling_source(base_model_class(model), RECORD_VERSION)
        (save_directory / MODELING_FILE).write_text(source)
    else:  # a stale copy from an earlier save into this folder would contradict config.json
        (save_directory / MODELING_FILE).unlink(missing_ok=True)
    model_card(model, None if plain else record, base_model=base_model, metrics=metrics,
               auto_map=remote).save(save_directory / "README.md")
    return save_directory


class PatchedSavePretrained:
    """A patched model's ``save_pretrained``: :func:`save_pretrained` (remote code when possible).

    Installed on the instance by ``patch_model`` and loading, so that code that calls
    ``model.save_pretrained`` (the Trainer's checkpoints) writes a shareable folder.  An
    object of a module-level class, not a bound method: it pickles, deep-copies (following
    the copied model) and survives ``torch.save(model)`` / ``torch.load`` and spawned workers.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, **kwargs):
        if "remote_code" not in kwargs:
            try:
                auto_map(self.model)
            except ValueError:  # not a transformers class: weights, record and card only
                kwargs["remote_code"] = False
        return save_pretrained(self.model, save_directory, **kwargs)


def attach_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write what :func:`save_pretrained` writes."""
    from transformers import PreTrainedModel
    if isinstance(model, PreTrainedModel):
        model.__dict__["save_pretrained"] = PatchedSavePretrained(model)


def detach_save_pretrained(model: nn.Module) -> None:
    """The class's own ``save_pretrained`` again."""
    if isinstance(model.__dict__.get("save_pretrained"), PatchedSavePretrained):
        del model.__dict__["save_pretrained"]


def push_to_hub(model, repo_id: str, *, private: Optional[bool] = None, token=None,
                commit_message: str = "Upload hf_adanorm model", revision: Optional[str] = None,
                create_pr: bool = False, **save_kwargs):
    """Upload exactly what :func:`save_pretrained` writes to the hub repo ``repo_id``.

    ``save_kwargs`` go to :func:`save_pretrained` (``remote_code``, ``plain``,
    ``base_model``, ``metrics`` ...).  Returns huggingface_hub's commit info
    (None on non-main processes).
    """
    from huggingface_hub import HfApi
    model = _unwrap(model)
    if not _is_main_process():
        return None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, is_main_process=True, **save_kwargs)  # validates first
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)

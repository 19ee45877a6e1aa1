"""Save, load and share patched models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A folder written by :func:`save_pretrained` holds

* ``model.safetensors``: the weights (the replaced norms have none);
* ``config.json``: the model's config plus ``hf_adanorm``, the versioned patch
  record (norm and options, every replaced module's kind, size and eps, and what
  ``fold_affine`` did), under the model_type ``hf_adanorm_<stock type>`` with one
  size field replaced by a sentence saying how to load it (:mod:`.portable`), so
  that plain transformers refuses it instead of building the stock model; and an
  ``auto_map`` to the remote code;
* ``modeling_hf_adanorm.py``: self-contained remote code (see :mod:`.remote_code`);
* ``README.md``: a model card.

:func:`from_pretrained` undoes the guard, validates the record, then builds the model
through a subclass whose ``__init__`` checks the record against the model and
re-applies the patch *before* transformers loads the weights, so no key is missing
or unexpected.  With ``plain=True`` a LayerNorm-simple model is written as a stock
checkpoint instead (gain 1, bias 0 in the ordinary norm slots) that loads with
transformers alone.  Saving replaces the folder atomically (:mod:`.atomic_folder`)
and gathers FSDP2 / ZeRO-3 shards (:mod:`.gather`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import portable
from .atomic_folder import check_target, staged_folder
from .blend import SWAP_IN_PROGRESS, mark_swap_in_progress
from .config import NormConfig
from .gather import agree_before_collective, full_state_dict, sharding
from .loaded_config import reading_config_class
from .portable import CheckpointError
from .record import (CONFIG_KEY, PatchState, check_record, get_record, record_from_config, set_state,
                     swap_module)
from .registry import build_norm, keep_output_dtype, warn_output_dtype
from .remote_code import (MODELING_FILE, auto_map, base_model_class, guarded_field, modeling_source,
                          stock_class)
from .wrappers import unwrap

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# Options of the model's from_pretrained, not config values: load_config would set some of them on the
# config (dtype="auto" there raises: torch has no dtype "auto"). Besides these, every named parameter of
# PreTrainedModel.from_pretrained (see _model_kwargs); the list is what transformers 4.x and 5 pop.
_MODEL_KWARGS = ("dtype", "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_buffers",
                 "offload_state_dict", "attn_implementation", "experts_implementation", "quantization_config",
                 "low_cpu_mem_usage", "output_loading_info", "state_dict", "proxies", "tqdm_class", "variant",
                 "adapter_kwargs", "adapter_name", "generation_config", "gguf_file", "distributed_config",
                 "device_mesh", "tp_plan", "tp_size", "allow_all_kernels", "use_kernels", "kernel_config",
                 "key_mapping", "mirror", "_fast_init", "from_tf", "from_flax", "_from_pipeline", "_from_auto",
                 "use_flash_attention_2", "ignore_mismatched_sizes", "use_safetensors", "weights_only")
# What a save writes (or must not leave behind from an earlier save) in its folder; any other
# entry there (a tokenizer, a Trainer's checkpoint-N folders ...) is carried over.
_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
_SAVE_FILES = {"config.json", "generation_config.json", "README.md", MODELING_FILE, "hf_adanorm_patch.json"}


def rebuild_patch(model: nn.Module, record: dict) -> None:
    """Apply a saved patch to a freshly built (unpatched) ``model``; checks everything first:
    the record itself, then that each module it names exists and is a norm of that kind and size.
    A class other than the saved one (AutoModel on a causal-LM checkpoint) takes the record as
    :func:`portable.record_for` maps it."""
    config = check_record(record)
    record = portable.record_for(model, record, (getattr(model.config, "architectures", None) or [None])[0])
    found = portable.check_against_model(model, record)
    swaps, unfollowed = [], {}
    for name, entry in record["modules"].items():
        eps = config.eps if config.eps is not None else entry["eps"]
        new = build_norm(config, entry["kind"], (entry["size"],), eps)
        if not keep_output_dtype(new, found[name][1], found[name][0]):
            unfollowed[name] = new
        swaps.append((name, new))
    warn_output_dtype(unfollowed)
    for name, new in swaps:
        new.train(model.get_submodule(name).training)
        swap_module(model, name, new)
    for name in (record.get("fold") or {}).get("added_bias", []):  # folding gave these a bias
        layer = model.get_submodule(name)
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    portable.keep_ties(model, (record.get("fold") or {}).get("kept_ties", {}))
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
        if not isinstance(config, model_class.config_class):
            raise ValueError(f"the checkpoint holds a {type(config).__name__}, which {model_class.__name__} "
                             f"cannot be built from; pass its own class ({config.architectures}) or an Auto class")
        return model_class
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        raise TypeError(f"model_class must be a transformers model or AutoModel class, got {model_class!r}")
    if type(config) not in mapping:
        raise ValueError(f"{model_class.__name__} cannot build a model from {type(config).__name__}")
    built = mapping[type(config)]
    if isinstance(built, (tuple, list)):  # several classes (DeiT, Funnel): the saved one, as transformers picks
        return next((cls for cls in built if cls.__name__ in (config.architectures or [])), built[0])
    return built


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path, **kwargs)`` for any checkpoint, patched or not.

    A patched checkpoint's config.json names remote code, for the model. ``AutoTokenizer`` reads that
    config and asks whether to run the code, a prompt that waits 15 s for an answer wherever stdin is
    open (a terminal, a pipe), though no tokenizer needs it. Here it gets the stock config instead.
    """
    from transformers import AutoTokenizer
    if kwargs.get("config") is None:  # (config=None, as a wrapper passes it on, is no config)
        try:
            config = load_config(path, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
        except Exception:  # noqa: BLE001 - not a model folder (a tokenizer alone): AutoTokenizer decides
            config = None
        if getattr(config, "hf_adanorm", None) is not None:
            kwargs["config"] = config
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_config(path, model_class=None, *, return_unused_kwargs: bool = False, **kwargs):
    """The config of any checkpoint, patched or not, as its stock transformers class, with the
    patch record (if any) under ``hf_adanorm``: what ``AutoConfig.from_pretrained`` gives for a
    stock checkpoint, without running a patched one's remote code (it reads config.json only).

    ``model_class``: a concrete class whose ``config_class`` to use (default: by model_type);
    ``kwargs``: hub options (``revision`` ...) and config values to override (``num_labels=3``);
    with ``return_unused_kwargs``, ``(config, the kwargs that are not config values)``.
    """
    from transformers import PreTrainedConfig, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub)
    if not config_dict:  # a local folder without config.json
        raise CheckpointError(_no_config(path))
    config_dict = portable.unguard_config_dict(config_dict)
    ours = f"{MODELING_FILE[:-3]}."  # entries pointing at the remote code: not run here, not kept
    kept = {k: v for k, v in (config_dict.pop("auto_map", None) or {}).items()
            if not (isinstance(v, str) and v.startswith(ours))}
    if kept:
        config_dict["auto_map"] = kept
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        config_class = model_class.config_class
    elif config_dict.get("model_type") in CONFIG_MAPPING:
        config_class = CONFIG_MAPPING[config_dict["model_type"]]
    else:
        raise CheckpointError(f"{path}'s config.json has the model_type {config_dict.get('model_type')!r}, which "
                              "this transformers does not know; upgrade transformers or pass the concrete class")
    return config_class.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


def _no_config(path) -> str:
    """Why a folder without config.json loads no model, and, for PEFT adapters, what to load instead."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        return f"{path} has no config.json: it is not a saved model folder"
    try:
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        saved_patched = CONFIG_KEY in json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError, AttributeError, TypeError):  # no base named, or not a local model folder
        saved_patched = False
    adapters = f"peft.PeftModel.from_pretrained(base, {str(path)!r})"
    if saved_patched:
        return (f"{path} holds PEFT adapters (adapter_config.json), not a model: load the patched model they were "
                f"trained on, base = hf_adanorm.from_pretrained(model_class, {str(base)!r}), then {adapters}")
    return (f"{path} holds PEFT adapters (adapter_config.json), not a model, and the model they were trained on "
            "was patched in memory: load that model, patch it as it was (a Trainer checkpoint written with "
            f"PatchCallback holds the record in hf_adanorm_patch.json), then {adapters}. A model patched otherwise, "
            "or not at all, takes the adapters without an error")


def from_pretrained(model_class, pretrained_model_name_or_path, *model_args, **kwargs):
    """Load a checkpoint written by :func:`save_pretrained`, patch included.

    ``model_class`` is an Auto class (``AutoModelForCausalLM``) or a concrete
    transformers class; ``kwargs`` go to its ``from_pretrained`` (``dtype``,
    ``device_map`` ...).  Weights are read from safetensors only, and the remote code in
    the folder is not run (``trust_remote_code`` is not needed).  Raises
    :class:`CheckpointError` (nothing loaded) for a record that is missing, newer
    than this hf_adanorm, corrupted, names an unknown norm, or does not fit the model
    (a module it lacks, one that is not a norm of the recorded kind and size).
    """
    if kwargs.get("use_safetensors") is False:
        raise ValueError("hf_adanorm loads weights from safetensors only (no pickle)")
    kwargs["use_safetensors"] = True
    kwargs.pop("trust_remote_code", None)  # the stock class is used; the remote code is not needed
    config = kwargs.pop("config", None)
    if config is None or isinstance(config, (str, Path)):
        # config attributes among kwargs (num_labels=...) go to the config, as in transformers
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        loading = _model_kwargs(kwargs)
        config, kwargs = load_config(config or pretrained_model_name_or_path, model_class,
                                     return_unused_kwargs=True, **kwargs)
        kwargs.update(hub, **loading)
    else:
        config = copy.deepcopy(config)  # loading moves the record from the config to the model
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
    model.config.__class__ = reading_config_class(type(model.config))  # reads its own folder: see loaded_config
    return loaded


@functools.lru_cache(maxsize=1)
def _model_option_names() -> frozenset:
    """The options of the model's ``from_pretrained`` (read once: its signature does not change)."""
    from transformers import PreTrainedModel
    named = [p.name for p in inspect.signature(PreTrainedModel.from_pretrained).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY or p.default is not inspect.Parameter.empty]
    return frozenset({*_MODEL_KWARGS, *named} - {"config", *_HUB_KWARGS})


def _model_kwargs(kwargs: dict) -> dict:
    """Pop from ``kwargs`` (and return) the options of the model's ``from_pretrained``, as transformers
    does before it reads the config from the rest."""
    return {k: kwargs.pop(k) for k in _model_option_names() if k in kwargs}


def _is_main_process() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _plain_problems(record, config: NormConfig) -> list:
    """Why the stock architecture would not compute this patched model (empty: it does)."""
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
    if SWAP_IN_PROGRESS in record:
        problems.append("its norms are still being blended in (a gradual swap in progress)")
    return problems


def _plain_state_dict(model, record, state: dict) -> dict:
    """The state dict of the stock model computing the same: every norm gain 1, bias 0."""
    state = dict(state)
    dtype = next(model.parameters()).dtype
    for name, entry in record["modules"].items():
        if entry["gain"]:
            state[f"{name}.{entry['gain']}"] = torch.full((entry["size"],), 1.0 - entry["gain_offset"], dtype=dtype)
        if entry.get("bias"):
            state[f"{name}.{entry['bias']}"] = torch.zeros(entry["size"], dtype=dtype)
    return state


def _config_json(model, record: Optional[dict], remote: Optional[dict]) -> str:
    """config.json's text: the record (None: a plain checkpoint, none) and, for a patched one, the
    guard of :mod:`.portable` (own model_type, a size field stock classes refuse) and ``auto_map``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    # entries pointing at our remote code (kept from a folder this model was loaded from) go:
    # without the file they would break trust_remote_code loading
    ours = f"{MODELING_FILE[:-3]}."
    kept = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items()
            if not (isinstance(v, str) and v.startswith(ours))}
    if hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    config.architectures = [stock_class(model).__name__]
    data = config.to_diff_dict()
    if remote is not None:
        kept.update(remote)
    if kept:
        data["auto_map"] = kept
    if record is not None:
        data[CONFIG_KEY] = record
        field = guarded_field(type(config))
        if field is not None:  # its value in full: to_diff_dict leaves out a default one
            data[field[0]] = config.to_dict()[field[0]]
        data = portable.guard_config_dict(data, config.model_type, field)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _replaced_by_save(name: str) -> bool:
    return name in _SAVE_FILES or name.startswith(_WEIGHT_PREFIXES)


@contextmanager
def _as_stock_class(model):
    """FSDP2 turns the model's class into ``FSDP<Class>``: while saving it is ``<Class>`` again."""
    original, model.__class__ = type(model), stock_class(model)
    try:
        yield
    finally:
        model.__class__ = original


def save_pretrained(model, save_directory, *, remote_code: Optional[bool] = None, plain: bool = False,
                    base_model: Optional[str] = None, metrics: Optional[dict] = None,
                    is_main_process: Optional[bool] = None, **kwargs) -> Optional[Path]:
    """Save a patched model so that it loads again, with or without hf_adanorm, never as another model.

    Writes safetensors weights, config.json with the patch record under a model_type of
    its own (plain transformers refuses it, see docs/checkpoints.md), a model card
    (``base_model``: the hub id of the original model; ``metrics``: a dict of results to
    list) and, for transformers' own classes (``remote_code`` None or True),
    ``modeling_hf_adanorm.py`` with ``auto_map`` for
    ``AutoModelFor...from_pretrained(dir, trust_remote_code=True)``.  ``plain=True``
    writes a stock checkpoint instead (see module docstring).

    The folder is replaced atomically (:mod:`.atomic_folder`): every argument is checked
    first, then all is written into a temporary sibling and swapped in, so an error or a
    kill leaves the old folder as it was.  Other files in it (a tokenizer ...) are kept.
    DDP/accelerate/DeepSpeed wrappers are unwrapped.  A model sharded by FSDP2 or ZeRO-3
    is gathered: then every rank must call this (a collective); only the main process
    writes (others return None).  ``kwargs`` go to transformers' ``save_pretrained``.
    """
    from .card import model_card
    model = unwrap(model)
    sharded = sharding(model) if kwargs.get("state_dict") is None else None
    with agree_before_collective(sharded):  # a rank that fails here fails them all, before gathering
        _refuse_peft_layers(model)
        record = get_record(model)
        if record is None:
            raise ValueError("the model is not patched by hf_adanorm; use model.save_pretrained")
        config = check_record(record)
        record = mark_swap_in_progress(model, record)  # a checkpoint inside GradualSwapCallback's ramp
        if kwargs.pop("safe_serialization", True) is False or kwargs.get("push_to_hub"):
            raise ValueError("hf_adanorm saves safetensors only, and pushes with hf_adanorm.push_to_hub")
        if plain and (problems := _plain_problems(record, config)):
            raise ValueError("plain=True needs a model the stock architecture computes exactly: "
                             + "; ".join(problems) + ". Save without plain=True (remote code) instead.")
        if is_main_process is None:
            is_main_process = _is_main_process()
        if sharded is not None and is_main_process != (torch.distributed.get_rank() == 0):
            raise ValueError("a sharded model is gathered on rank 0, which writes: leave is_main_process unset")
        target = check_target(save_directory) if is_main_process else None
        if remote_code is None:  # when the model is one of transformers' own classes
            remote_code = not plain and _can_generate(model)
        remote = auto_map(model) if remote_code and not plain else None  # raises before writing
        with _as_stock_class(model):
            card = model_card(model, None if plain else record, base_model=base_model, metrics=metrics,
                              auto_map=remote)
            _config_json(model, None if plain else record, remote)  # what cannot be guarded raises here
            source = modeling_source(base_model_class(model)) if remote is not None else None
    state_dict = kwargs.pop("state_dict", None)
    if sharded is not None:
        state_dict = full_state_dict(model, sharded)  # collective: on every rank
    if not is_main_process:
        return None
    if plain:
        state_dict = _plain_state_dict(model, record, model.state_dict() if state_dict is None else state_dict)
    with staged_folder(target, replaces=_replaced_by_save) as staging, _as_stock_class(model):
        type(model).save_pretrained(model, staging, state_dict=state_dict, is_main_process=True, **kwargs)
        (staging / "config.json").write_text(_config_json(model, None if plain else record, remote))
        if source is not None:
            (staging / MODELING_FILE).write_text(source)
        card.save(staging / "README.md")
    return Path(save_directory)


def _refuse_peft_layers(model) -> None:
    """Refuse a model with PEFT layers injected (LoRA ...): its state dict holds ``base_layer`` /
    ``lora_A`` keys that the saved stock architecture lacks, so its weights would load as random ones."""
    import sys
    if sys.modules.get("peft") is None:  # peft never imported: nothing can have been injected
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if layers:
        shown = ", ".join(layers[:3]) + (" ..." if len(layers) > 3 else "")
        raise ValueError(f"the model has PEFT adapter layers ({shown}), which the saved architecture has no "
                         "place for: merge them into the weights first "
                         "(peft_model.merge_and_unload()) or remove them (peft_model.unload()), then save")


def _can_generate(model) -> bool:
    try:
        auto_map(model)
    except ValueError:  # not a transformers class: weights, record and card only
        return False
    return True


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
    model = unwrap(model)
    if not _is_main_process():
        return None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, is_main_process=True, **save_kwargs)  # validates first
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)

"""``transformers.Trainer`` integration: patch at the right moment, and watch the norms train.

* :class:`PatchCallback` swaps the norms when the ``Trainer`` is built (``on_init_end``),
  i.e. before the optimizer is created and before accelerate / DeepSpeed / FSDP wrap
  the model, and writes the patch record into every ``checkpoint-N`` folder.
* :class:`NormGradientStatsCallback`, :class:`AdaNormMonitorCallback` and
  :class:`AffineDriftCallback` (defined in :mod:`hf_adanorm.monitors`) log what the
  norms do while training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .blend import SWAP_IN_PROGRESS, mark_swap_in_progress
from .config import NormConfig
from .monitors import AdaNormMonitorCallback, AffineDriftCallback, NormGradientStatsCallback
from .patch import get_patch_record, is_patched, patch_model
from .record import CONFIG_KEY as _CONFIG_KEY
from .training.checkpoints import write_json_atomic
from .wrappers import inner_model

__all__ = ["AdaNormMonitorCallback", "AffineDriftCallback", "NormGradientStatsCallback", "PatchCallback",
           "PATCH_RECORD_FILE", "write_patch_record"]

logger = logging.getLogger(__name__)

PATCH_RECORD_FILE = "hf_adanorm_patch.json"
_WRAPPER_CLASS_NAMES = {"DataParallel", "DistributedDataParallel", "FullyShardedDataParallel",
                        "DeepSpeedEngine", "PipelineEngine", "OptimizedModule"}


def _wrapper_name(model: nn.Module) -> Optional[str]:
    """The class name if ``model`` is already wrapped by DDP / FSDP / DeepSpeed / torch.compile."""
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 turns the model itself into an FSDPModule
        if isinstance(model, FSDPModule):
            return type(model).__name__
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    for cls in type(model).__mro__:
        if cls.__name__ in _WRAPPER_CLASS_NAMES:
            return cls.__name__
    return None


def write_patch_record(folder, record: dict) -> None:
    """Put ``record`` in ``folder/hf_adanorm_patch.json`` and under "hf_adanorm" in its config.json."""
    folder = Path(folder)
    write_json_atomic(folder / PATCH_RECORD_FILE, record)
    config_file = folder / "config.json"
    if config_file.is_file():  # save_pretrained already wrote model.config.hf_adanorm; make sure
        config = json.loads(config_file.read_text())
        if config.get(_CONFIG_KEY) != record:
            config[_CONFIG_KEY] = record
            write_json_atomic(config_file, config)


def checkpoint_folder(args, state) -> Path:
    """Where the Trainer writes (or wrote) the checkpoint of ``state.global_step``."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class PatchCallback(TrainerCallback):
    """``Trainer(model, args, callbacks=[PatchCallback("adanorm", k=0.1)])`` trains a patched model.

    Takes the arguments of :func:`hf_adanorm.patch_model` (validated here, at once).
    The swap happens in ``on_init_end``: after ``Trainer.__init__`` has placed the
    model on its device, before ``train()`` builds the optimizer and lets
    accelerate / DeepSpeed / FSDP wrap the model, so the optimizer only ever sees
    the new (parameter-free) norms.  It refuses, with ``RuntimeError``, whenever
    that moment has passed: an optimizer handed to the Trainer, an already wrapped
    model, a model created later by ``model_init``, or a callback added with
    ``trainer.add_callback`` after construction.  A model already patched with the
    same configuration is left alone (e.g. a second Trainer on the same model, or a PEFT
    ``PeftModel`` of it: patch, then ``get_peft_model``).
    On every save it writes the patch record into ``checkpoint-N``
    (:data:`PATCH_RECORD_FILE` and ``config.json["hf_adanorm"]``).
    """

    resumes_a_swap = False  # a checkpoint inside GradualSwapCallback's ramp is resumed by that callback only

    def __init__(self, norm="adanorm", *, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 **options):
        self.config = NormConfig.from_options(norm, options)
        self.filter_fn = filter_fn
        self.report = None  # the PatchReport, once patched

    def _same_patch(self, model) -> bool:
        model = extract_model_from_parallel(model)  # train() may have wrapped it by now
        return is_patched(model) and get_patch_record(model)["config"] == self.config.to_dict()

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if is_patched(model):
            if not self._same_patch(model):
                done = get_patch_record(model)["config"]
                inner = "peft_model.get_base_model()" if inner_model(model) is not model else "model"
                raise RuntimeError(f"PatchCallback: the model is already patched with {done}, not "
                                   f"{self.config.to_dict()}; call hf_adanorm.unpatch_model({inner}) first.")
            logger.info("hf_adanorm: model already patched with the same configuration; nothing to do")
            return
        if optimizer is not None:
            raise RuntimeError(
                "PatchCallback: the Trainer was given an optimizer, built on the model's current "
                "parameters (including the LayerNorm gains and biases the patch removes). Let the "
                "Trainer create the optimizer (optimizers=(None, None)), or call "
                "hf_adanorm.patch_model(model, ...) before building your optimizer.")
        wrapper = _wrapper_name(model)
        if wrapper is not None:
            raise RuntimeError(
                f"PatchCallback: the model is already wrapped by {wrapper}; patch the bare model "
                "(hf_adanorm.patch_model) before wrapping, compiling or sharding it.")
        self.report = patch_model(model, self.config, filter_fn=self.filter_fn)
        logger.info("hf_adanorm: %s", self.report)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._same_patch(model):
            raise RuntimeError(
                "PatchCallback: the model being trained is not the one patched when the Trainer was "
                "built (it is patched on Trainer(...); a model_init creates a new model in train(), "
                "and trainer.add_callback comes after construction). Pass the callback as "
                "Trainer(..., callbacks=[PatchCallback(...)]) without model_init, or call "
                "hf_adanorm.patch_model inside your model_init.")
        self._check_resumed_checkpoint(args, state)

    def _check_resumed_checkpoint(self, args, state) -> None:
        """A resumed run must be patched as the checkpoint it continues (checked when that
        checkpoint is ``output_dir/checkpoint-N``, where the Trainer writes them). A PEFT run's
        checkpoint has its adapters and no config.json: the record is in :data:`PATCH_RECORD_FILE`
        (written by :meth:`on_save`; without it, nothing tells how the run was patched)."""
        folder = checkpoint_folder(args, state)
        config_file, record_file = folder / "config.json", folder / PATCH_RECORD_FILE
        if state.global_step == 0:
            return
        if config_file.is_file():
            record = json.loads(config_file.read_text()).get(_CONFIG_KEY) or {}
        elif record_file.is_file():  # a PeftModel's checkpoint (adapter_config.json, adapter weights)
            record = json.loads(record_file.read_text()) or {}
        else:
            return
        if SWAP_IN_PROGRESS in record and not self.resumes_a_swap:
            raise RuntimeError(f"PatchCallback: the run resumed from {folder} was inside "
                               "GradualSwapCallback's ramp (its original norms still blended in); resume it with "
                               "the same GradualSwapCallback")
        saved = record.get("config")
        if saved != self.config.to_dict():
            saved_as = f"patched with {saved}" if saved else "not patched by hf_adanorm"
            raise RuntimeError(
                f"PatchCallback: the run resumed from {folder} was {saved_as}, but this "
                f"callback patches with {self.config.to_dict()}; its weights would continue under "
                "different norms. Resume with the same PatchCallback arguments.")

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:  # only the process that writes checkpoints
            return
        folder = checkpoint_folder(args, state)
        if not folder.is_dir():
            logger.warning("hf_adanorm: checkpoint folder %s not found; patch record not written", folder)
            return
        unwrapped = inner_model(model)  # the record's names are the patched model's
        write_patch_record(folder, mark_swap_in_progress(unwrapped, get_patch_record(unwrapped)))

"""The Accelerate training loop shared by the classification and causal-LM recipes.

Read top to bottom it is the loop of accelerate's own examples: build everything,
``prepare``, then ``accumulate`` / ``backward`` / ``step``, with evaluation through
``gather_for_metrics``, crash-safe ``save_state`` checkpoints and exact resumption
(mid-epoch too: the data order of an epoch depends only on ``seed`` and the epoch,
and the RNG states come back with ``load_state``).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..checkpoint import save_pretrained as save_patched
from ..patch import is_patched
from ..convert.fingerprint import data_fingerprint
from ..sources import check_apart
from . import checkpoints
from .args import FP16_ON_CPU, TrainingArgs
from .checkpoints import CHECKPOINT_DIR, METRICS_FILE, RUN_CONFIG_FILE
from .locks import check_not_in_use, folder_lock
from .modeling import CONFIG_PREFIX, fold_outcome, unfolded_warning
from .optimizer import make_optimizer

MODEL_DIR = "model"

logger = get_logger(__name__)  # main process only


@dataclass
class Task:
    """What a recipe supplies to :func:`train`."""

    model: torch.nn.Module  # already patched (or the LayerNorm baseline)
    tokenizer: object
    splits: dict  # "train", "validation" and optionally "test": torch-ready datasets
    collate_fn: Callable
    eval_step: Callable  # (model, batch) -> {name: per-example tensor}
    compute_metrics: Callable  # ({name: numpy array over the split}) -> {metric: float}
    patch_report: Optional[object] = None
    info: dict = field(default_factory=dict)  # extra facts for run_config.json


@dataclass
class TrainResult:
    metrics: dict
    model: torch.nn.Module  # unwrapped
    accelerator: Accelerator


def progress_bar(accelerator: Accelerator, **kwargs):
    """A tqdm bar on the main process only, hidden while TQDM_DISABLE is set: `compare --no-progress` sets
    it for its runs, and tqdm itself reads it once, when it is first imported."""
    hidden = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return tqdm(disable=hidden or not accelerator.is_local_main_process, **kwargs)


def make_accelerator(args: TrainingArgs) -> Accelerator:
    # Under torchrun/accelerate launch with no GPU, Accelerator(cpu=False) would start N
    # independent single-process runs; cpu=True makes them one gloo process group.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = args.cpu or (multi_process and not torch.cuda.is_available() and not deepspeed)  # cpu=True turns DeepSpeed off
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # the shuffle of epoch e is drawn from seed + e alone, so a resumed run sees the same order
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if deepspeed and (accelerator.distributed_type != DistributedType.DEEPSPEED
                      or accelerator.num_processes != int(os.environ.get("WORLD_SIZE", "1"))):
        raise RuntimeError(f"launched with DeepSpeed, but accelerate set up {accelerator.distributed_type.value} "
                           f"over {accelerator.num_processes} process(es): accelerate runs DeepSpeed on GPUs only; "
                           "on CPU launch with recipes/configs/cpu_2proc.yaml")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, args)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # e.g. from the launcher
        raise ValueError(FP16_ON_CPU)
    if multi_process and accelerator.num_processes == 1:
        raise RuntimeError("launched as several processes but accelerate set up only one; pass --cpu")
    if not accelerator.is_local_main_process:  # one set of progress bars and warnings per machine
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    return accelerator


def _check_deepspeed_config(config: dict, args: TrainingArgs) -> None:
    """Under DeepSpeed its config, not the loop, accumulates gradients and clips them; where it
    disagrees with the run's options accelerate only warns, at prepare(), and the run would train
    differently from what its options (and run_config.json, and the step counts) say."""
    accumulation = config.get("gradient_accumulation_steps", "auto")  # 'auto': filled from the run's
    clipping = config.get("gradient_clipping", "auto")
    clipping = 1.0 if clipping == "auto" else (float(clipping) or None)  # accelerate fills 'auto' with 1.0; 0: off
    wrong = []
    if accumulation != "auto" and int(accumulation) != args.gradient_accumulation_steps:
        wrong.append(f"gradient_accumulation_steps {accumulation} (the run's --gradient_accumulation_steps: "
                     f"{args.gradient_accumulation_steps})")
    if clipping != args.max_grad_norm:
        wrong.append(f"gradient_clipping {clipping} (the run's --max_grad_norm: {args.max_grad_norm})")
    if wrong:
        raise ValueError(f"the DeepSpeed config has {' and '.join(wrong)}, and DeepSpeed would use its own "
                         "values: make them agree, e.g. `accelerate launch --config_file ... "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps} "
                         f"--gradient_clipping {args.max_grad_norm or 0} ...`")


def evaluate(accelerator, model, dataloader, task: Task) -> dict:
    model.eval()
    parts = defaultdict(list)
    for batch in dataloader:
        with torch.no_grad():
            outputs = task.eval_step(model, batch)
        for name, value in accelerator.gather_for_metrics(outputs).items():
            parts[name].append(value.float().cpu())
    model.train()
    return task.compute_metrics({name: torch.cat(values).numpy() for name, values in parts.items()})


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def _check_output_dir(args, resume_path) -> None:
    """A fresh run would delete metrics.json and overwrite model/: refuse another run's folder."""
    if resume_path is not None or args.overwrite_output_dir:
        return
    output_dir = Path(args.output_dir)
    if checkpoints.latest_checkpoint(output_dir) is not None:
        raise FileExistsError(f"{output_dir} already holds checkpoints of another run: pass "
                              "--resume_from_checkpoint latest to continue it, --overwrite_output_dir "
                              "to start afresh, or another --output_dir")
    found = [name for name in (METRICS_FILE, MODEL_DIR) if (output_dir / name).exists()]
    if found:
        raise FileExistsError(f"{output_dir} already holds the results of another run ({', '.join(found)}): "
                              "pass --overwrite_output_dir to replace them, or another --output_dir")


def _save_final_model(accelerator, model, task: Task, directory: Path, args, final: dict) -> str:
    """Save a patched model with hf_adanorm.save_pretrained (weights, patch record, remote code,
    model card), the LayerNorm baseline with its own save_pretrained; main process only."""
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP / ZeRO-3: all ranks call it
    if not accelerator.is_main_process:
        return ""
    unwrapped = accelerator.unwrap_model(model)
    with _own_class(unwrapped):
        if is_patched(unwrapped):
            base_model = None if args.model.startswith(CONFIG_PREFIX) else args.model
            save_patched(unwrapped, directory, state_dict=state_dict, base_model=base_model, metrics=final,
                         is_main_process=True)
            fmt = "hf_adanorm.save_pretrained"
        else:
            unwrapped.save_pretrained(directory, state_dict=state_dict)
            fmt = "save_pretrained"
    task.tokenizer.save_pretrained(directory)
    return fmt


@contextmanager
def _own_class(model):
    """FSDP2's ``fully_shard`` turns the model, in place, into an ``FSDP<Class>(FSDPModule, <Class>)``;
    saved as is, config.json's architectures, the remote code and the card would name that class.
    Only while saving (the gathered state dict is passed, no forward runs) it is a ``<Class>`` again."""
    original = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):
            model.__class__ = next(base for base in original.__bases__ if not issubclass(base, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = original


@contextmanager
def _whole_model_under_zero3(accelerator):
    """Under ZeRO-3 transformers builds models inside deepspeed.zero.Init, already partitioned:
    patch_model could not probe the norms, and the construction would be collective. Build and
    patch the whole model instead; deepspeed.initialize partitions it in prepare()."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def resumed_batches(accelerator, loader, loop: dict, epoch: int):
    """The batches of ``epoch``, less those a resumed checkpoint (``loop``) already trained on;
    ``loop`` then counts from there."""
    loader.set_epoch(epoch)
    skip = loop["batches_in_epoch"] if epoch == loop["epoch"] else 0
    loop["epoch"], loop["batches_in_epoch"] = epoch, skip
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def backward_and_step(accelerator, model, loss, optimizer, scheduler, max_grad_norm) -> None:
    """One micro-batch's backward; on the step's last micro-batch also clip, step and zero."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()  # accelerate's wrappers skip this until the gradients are synced
    scheduler.step()
    optimizer.zero_grad()


def train(args: TrainingArgs, build_task: Callable[[TrainingArgs], Task]) -> TrainResult:
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)

    # Everything that can fail on bad input fails here, before a file is written. A folder in use
    # first: a running run's checkpoints would otherwise read as an interrupted run's.
    args.check_sources()
    if accelerator.is_main_process:
        check_not_in_use(output_dir, "training run")
    resume_path = _check_start(args, accelerator)
    with accelerator.main_process_first(), _whole_model_under_zero3(accelerator):
        task = build_task(args)  # the main process fills the datasets cache first

    with ExitStack() as lock:
        if accelerator.is_main_process:  # one run per folder; the kernel frees it if we are killed
            lock.enter_context(folder_lock(output_dir, "training run"))
            if _check_start(args, accelerator) != resume_path:
                raise RuntimeError(f"{output_dir} changed while this run was being set up: is another "
                                   "process writing there?")
        return _train(args, accelerator, task, resume_path)


def _check_start(args: TrainingArgs, accelerator) -> Optional[Path]:
    """The checkpoint to resume from (None: a fresh start), refusing an inexact resume or
    a fresh start over another run's results."""
    output_dir = Path(args.output_dir)
    # --overwrite_output_dir deletes model/ and checkpoints/, and the run writes its JSON files at the top,
    # where a --dataset folder would take them for data
    check_apart({name: getattr(args, name) for name in ("model", "tokenizer", "dataset")},
                [(output_dir, False), (output_dir / MODEL_DIR, True), (output_dir / CHECKPOINT_DIR, True)],
                "this run", "output_dir", args.output_dir)
    resume_path = checkpoints.resolve_resume(args)
    if resume_path is not None:
        checkpoints.check_resume(resume_path, args, accelerator.num_processes, accelerator.mixed_precision,
                                  accelerator.distributed_type.value, data_fingerprint(args.dataset))
    _check_output_dir(args, resume_path)
    return resume_path


def _train(args: TrainingArgs, accelerator, task: Task, resume_path: Optional[Path]) -> TrainResult:
    output_dir = Path(args.output_dir)
    model = task.model
    data_files = data_fingerprint(args.dataset)  # in each checkpoint: a resume on changed data is refused
    fold = fold_outcome(model, args)  # read before prepare() wraps the model
    warning = unfolded_warning(fold)
    if warning:
        logger.warning(warning)
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)  # no decay of norms and biases
    loader_seed = torch.Generator().manual_seed(args.seed)  # keeps DataLoader draws off the global RNG
    train_dataloader = DataLoader(task.splits["train"], shuffle=True, batch_size=args.per_device_batch_size,
                                  collate_fn=task.collate_fn, generator=loader_seed)
    eval_batch_size = args.eval_batch_size or args.per_device_batch_size
    eval_dataloaders = {name: DataLoader(task.splits[name], batch_size=eval_batch_size, collate_fn=task.collate_fn)
                        for name in ("validation", "test") if name in task.splits}
    # Each process gets every num_processes-th batch (the last ones repeated to even out).
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # A prepared scheduler steps once per process at each optimizer step, hence the factor. It is
    # prepared with the model and optimizer: under DeepSpeed a scheduler prepared alone would be
    # left unwrapped (stepped every micro-batch, and missing from save_state).
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    if len(train_dataloader) != batches_per_process:  # the step counts above would be wrong
        raise RuntimeError(f"expected {batches_per_process} training batches per process, "
                           f"accelerate made {len(train_dataloader)}")
    eval_dataloaders = {name: accelerator.prepare(dl) for name, dl in eval_dataloaders.items()}

    loop = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "loss_sum": 0.0, "loss_count": 0, "history": []}
    if resume_path is not None:
        loop = checkpoints.load_checkpoint(accelerator, resume_path)
        accelerator.print(f"resumed from {resume_path} at step {loop['step']}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_incomplete(output_dir)
        if resume_path is None and args.overwrite_output_dir:  # no stale step_N for a later "latest"
            for stale in (CHECKPOINT_DIR, MODEL_DIR):
                shutil.rmtree(output_dir / stale, ignore_errors=True)
        (output_dir / METRICS_FILE).unlink(missing_ok=True)  # its presence means "finished"
        checkpoints.write_json_atomic(output_dir / RUN_CONFIG_FILE, {
            "args": args.to_dict(), "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "global_batch_size": args.per_device_batch_size * accelerator.num_processes
            * args.gradient_accumulation_steps,
            "resumed_from": str(resume_path) if resume_path else None,
            "patch_report": task.patch_report.to_dict() if task.patch_report else None, "fold": fold,
            "versions": _versions(), **task.info})

    # The running loss stays on the device: loss.item() per micro-batch would make the host wait
    # for the device every time. It is read at checkpoints and evaluations only, and summed in
    # float64 in the same order as before, so the numbers do not depend on when it is read.
    # (a checkpoint from before the per-rank sums were kept has the main process's alone)
    own_sum = loop["loss_sums"][accelerator.process_index] if "loss_sums" in loop else loop["loss_sum"]
    loss_sum = torch.tensor(own_sum, dtype=torch.float64, device=accelerator.device)

    def evaluate_now(epoch):
        totals = accelerator.reduce(torch.stack([loss_sum, loss_sum.new_tensor(loop["loss_count"])]), "sum")
        entry = {"epoch": epoch + 1, "step": loop["step"],
                 "train_loss": (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")}
        entry.update(_prefixed("eval", evaluate(accelerator, model, eval_dataloaders["validation"], task)))
        loop["history"].append(entry)
        loss_sum.zero_()
        loop["loss_sum"], loop["loss_count"] = 0.0, 0
        loop.pop("loss_sums", None)
        accelerator.print(entry)

    progress = progress_bar(accelerator, total=total_steps, initial=loop["step"], desc=f"{args.task} [{args.norm}]")
    model.train()
    for epoch in range(loop["epoch"], num_epochs):
        for batch in resumed_batches(accelerator, train_dataloader, loop, epoch):
            if loop["step"] >= total_steps:  # resumed from the last step's checkpoint: nothing left to train
                break
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                backward_and_step(accelerator, model, loss, optimizer, lr_scheduler, args.max_grad_norm)
            loop["batches_in_epoch"] += 1
            loss_sum += loss.detach().double()
            loop["loss_count"] += 1
            if not accelerator.sync_gradients:
                continue
            loop["step"] += 1
            progress.update(1)
            if args.checkpointing_steps and loop["step"] % args.checkpointing_steps == 0:
                loop["loss_sum"] = loss_sum.item()
                # every rank's own sum (the main process writes the file): a resume gives each its own back
                loop["loss_sums"] = accelerator.gather(loss_sum.reshape(1)).tolist()
                checkpoints.save_checkpoint(accelerator, output_dir, loop["step"], loop,
                                            args.checkpoints_total_limit,
                                            run=checkpoints.run_record(args, accelerator.num_processes,
                                                                       accelerator.mixed_precision,
                                                                       accelerator.distributed_type.value,
                                                                       data_files))
            if loop["step"] >= total_steps:
                break
        last_epoch = epoch == num_epochs - 1
        if (epoch + 1) % args.eval_every == 0 or last_epoch:
            if not loop["history"] or loop["history"][-1]["step"] != loop["step"]:
                evaluate_now(epoch)
    progress.close()

    final = {name: value for name, value in loop["history"][-1].items() if name not in ("epoch", "step")}
    if "test" in eval_dataloaders:
        final.update(_prefixed("test", evaluate(accelerator, model, eval_dataloaders["test"], task)))
    model_format = ""
    if args.save_model:
        model_format = _save_final_model(accelerator, model, task, output_dir / MODEL_DIR, args, final)
    metrics = {"config": args.to_dict(), "history": loop["history"], "final": final,
               "world_size": accelerator.num_processes, "model_format": model_format, "fold": fold,
               "results_version": checkpoints.RESULTS_VERSION}
    if accelerator.is_main_process:
        checkpoints.write_json_atomic(output_dir / METRICS_FILE, metrics)  # last: the run is complete
    accelerator.print(f"final: {final}  (written to {output_dir / METRICS_FILE})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(metrics, accelerator.unwrap_model(model), accelerator)


def _versions() -> dict:
    import accelerate

    from .. import __version__
    return {"hf_adanorm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "python": platform.python_version()}

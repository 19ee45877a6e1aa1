"""The conversion loop: distil the original model (teacher) into a copy with the new norms
(student) while the schedule blends the norms in; Accelerate runs it on one process or many.

Read top to bottom: check everything, build teacher and student, measure the naive swap,
``prepare``, distil with crash-safe checkpoints, measure again, save. Resuming after a kill
rebuilds the same teacher, student and data order from the options and the seed, and
``load_state`` brings back the weights, optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from ..checkpoint import save_pretrained
from ..patch import get_patch_record, patch_model
from ..sources import check_model_source
from ..training import checkpoints
from ..training.locks import check_not_in_use, folder_lock
from ..training.loop import backward_and_step, make_accelerator, progress_bar, resumed_batches
from .args import ConvertArgs
from .data import collator, load_texts, load_tokenizer, tokenize
from .distill import FORWARD_OPTIONS, choose_objective, distill_loss, drift
from .exact_grad import exact_backward
from .data import eval_files
from .fingerprint import data_fingerprint, files_fingerprint, model_fingerprint
from .inputs import check_output_dir, load_teacher
from .rescale import RESCALABLE, NormTargets, apply_sites, output_scale, restore, verified_sites
from .report import ARGS_FILE, MODEL_DIR, OWN_FILES, summarize, write_reports
from .schedule import alphas, blend_sources, set_alphas, unwrap_norms, wrap_norms

EXACT = 1e-6  # below this relative error (or KL) the naive swap already is the original function
# Only these compute the plain normalization y in forward, so only they can equal the original once its
# gain and bias are folded away. A threshold alone is not enough: an LM with nearly flat predictions has
# a KL under it after any swap, AdaNorm's too.
CAN_BE_EXACT = ("layernorm_simple", "detachnorm")


def _freeze_unreached(student, teacher, batch, objective, extra, wrapped, device) -> list[str]:
    """Freeze the parameters the objective cannot reach (e.g. BERT's pooler under the hidden-state
    objective): they stay the teacher's, and DDP needs every trained parameter to get a gradient."""
    set_alphas(wrapped, [0.5] * len(wrapped))  # both paths of every blend are live
    batch = {k: v[:2].to(device) for k, v in batch.items()}
    with torch.no_grad():
        target = teacher(**batch, **extra)
    distill_loss(objective, target, student(**batch, **extra), batch["attention_mask"]).backward()
    unused = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in student.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    set_alphas(wrapped, [0.0] * len(wrapped))
    return unused


@contextmanager
def full_precision(model):
    """``model``'s forward without the autocast wrapper that ``accelerator.prepare`` puts on it under
    --mixed_precision: the figures describe the float32 weights that are saved, measured like the naive
    swap's (before prepare), not their bf16 or fp16 rounding (as large as a good conversion's own KL)."""
    inner = getattr(model, "module", model)  # under DDP the wrapper is on the module inside
    original = inner.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    patched = inner.__dict__["forward"]
    inner.forward = original
    try:
        yield
    finally:
        inner.forward = patched


def measure(model, teacher, loader, device, wrapped=None, causal: bool = False) -> dict:
    """Drift of ``model`` (norms fully swapped) from ``teacher`` over ``loader``, in float32."""
    saved = [b.alpha for b in (wrapped or {}).values()]
    if wrapped:
        set_alphas(wrapped, [1.0] * len(wrapped))
    was_training = model.training
    model.eval()
    sums = None
    with torch.no_grad(), full_precision(model):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            part = drift(teacher(**batch, output_hidden_states=True), model(**batch, output_hidden_states=True),
                         batch["attention_mask"], batch["input_ids"] if causal else None)
            if sums is None:
                sums = part
            else:
                for key, value in part.items():
                    sums[key] = ([a + b for a, b in zip(sums[key], value)] if isinstance(value, list)
                                 else sums[key] + value)
    model.train(was_training)
    if wrapped:
        set_alphas(wrapped, saved)
    return summarize(sums)


def _unchanged(naive: dict) -> bool:
    """Whether the naive swap measures as the teacher: its output and its representation. A classifier or
    an LM with nearly flat predictions has a tiny KL however its hidden states moved, so a model with logits
    needs its hidden states unchanged too, all but the last (a fold changes the last norm's output exactly
    where the logits stay the same: GPT-2's, a pre-LN classifier's); an encoder, its output itself."""
    if "kl" in naive:
        return naive["kl"] < EXACT and min(naive["layer_cosine"][:-1], default=1.0) > 1 - EXACT
    return naive["relative_error"] < EXACT


def _closer(a: dict, b: dict) -> bool:
    """Whether drift figures ``a`` are closer to the teacher than ``b``."""
    if "kl" in a:
        return a["kl"] < b["kl"]
    return a["embedding_cosine"] > b["embedding_cosine"]


def _text_fingerprint(args) -> dict:
    """The fingerprints of the local text files distilled on (``dataset``) and, with ``--eval_dataset``,
    of those measured on (None where an option is unset, a hub dataset or not on disk)."""
    measured = None
    if args.eval_dataset and Path(args.eval_dataset).exists():
        try:
            measured = files_fingerprint(eval_files(args.eval_dataset))
        except FileNotFoundError:  # no data file there: loading it says so
            pass
    return {"dataset": data_fingerprint(args.dataset), "eval_dataset": measured}


def _clearly_farther(final: dict, naive: dict) -> bool:
    """Whether a conversion ended clearly farther from the teacher than the naive swap: by more than
    noise (a KL 1.5 times and 1e-4 nats above, or a cosine 0.01 below), not by the last digits of two
    figures that are both about 0). A figure that is not a number (a diverged distillation: NaN weights)
    is as far as it gets; compared, it would read as not farther."""
    if not math.isfinite(final["kl"] if "kl" in final else final["embedding_cosine"]):
        return True
    if "kl" in final:
        return final["kl"] > 1.5 * naive["kl"] and final["kl"] - naive["kl"] > 1e-4
    return final["embedding_cosine"] < naive["embedding_cosine"] - 0.01


def _recorded_rescale(resume_path: Path | None) -> list[str] | None:
    """The norms a checkpoint's conversion started rescaled (None: a fresh start, or a checkpoint from
    before the choice was recorded, which makes it again)."""
    if resume_path is None:
        return None
    return json.loads((resume_path / checkpoints.STATE_FILE).read_text()).get("rescaled")


def _rescale_post_ln(student, teacher, record, probe, wrapped, naive, norm_config, remeasure, recorded=None):
    """Start every post-LN norm from the rescaled student (rescale.py) where that measures closer to the
    teacher than the naive swap; those norms leave the schedule (swapped from step 0).

    ``recorded`` (a resumed checkpoint's choice) is applied as it is, not chosen again: a choice made
    anew could differ in the last bit of a measurement, and the checkpoint's weights fit only its own."""
    if norm_config.norm not in RESCALABLE or recorded == []:  # no_norm's output is not about c·y
        return {}, None
    folded = set((record.get("fold") or {}).get("folded", {}))
    names = [name for name in record["modules"] if name not in folded]
    sites = verified_sites(teacher, names, {k: v[:2] for k, v in probe.items()})
    if recorded is not None:
        missing = sorted(set(recorded) - set(sites))
        if missing:
            raise RuntimeError(f"the checkpoint being resumed started {', '.join(missing)} rescaled, but this "
                               "teacher gives no rescaled start for them: is it the same model? Pass "
                               "--overwrite_output_dir to start afresh")
        sites = {name: sites[name] for name in recorded}
    if not sites:
        return {}, None
    saved = apply_sites(student, teacher.get_submodule, sites, output_scale(norm_config))
    if recorded is not None:  # the checkpoint holds the start's figures too: no measurement to redo
        return _rescaled_entries(student, wrapped, sites), None
    start = remeasure()
    keep = _closer(start, naive)
    keep = broadcast_object_list([keep])[0]  # every rank takes the main process's choice
    if not keep:
        restore(student, saved)
        return {}, None
    return _rescaled_entries(student, wrapped, sites), start


def _rescaled_entries(student, wrapped, sites) -> dict:
    """Take the rescaled norms out of the schedule (swapped from step 0); their report entries."""
    unwrap_norms(student, {name: wrapped.pop(name) for name in sites})
    return {name: {"gain": site.gain, "readers": site.readers, "writer": site.writer}
            for name, site in sites.items()}


def convert_model(args: ConvertArgs) -> dict:
    """Convert ``args.model`` to ``args.norm``; returns what is written to conversion.json."""
    started = time.time()
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    out = Path(args.output_dir)

    # Everything that can fail on bad input fails here, before a file is written.
    for name in ("model", "tokenizer"):
        if getattr(args, name) is not None:
            check_model_source(name, getattr(args, name))
    if accelerator.is_main_process:  # first: a running conversion's folder is not an interrupted one
        check_not_in_use(out, "conversion")
    # read on the main process only (every weight byte), then shared
    fingerprint = broadcast_object_list([model_fingerprint(args.model, args.tokenizer)
                                         if accelerator.is_main_process else None])[0]
    text_files = broadcast_object_list([_text_fingerprint(args) if accelerator.is_main_process else None])[0]
    resume_path = check_output_dir(args, accelerator.num_processes, fingerprint, accelerator.mixed_precision,
                                   accelerator.distributed_type.value, text_files)
    norm_config = args.norm_config()
    tokenizer = load_tokenizer(args)
    teacher, kind = load_teacher(args)
    causal = kind == "causal_lm"
    texts = load_texts(args, causal)
    data = tokenize(texts, tokenizer, args, causal, teacher.get_input_embeddings().num_embeddings)
    # Dropout off (eval mode) while distilling: the function to keep is the teacher's eval-mode one, and
    # dropout noise in the student alone would be a floor under the loss (measured: docs/conversion.md).
    student = copy.deepcopy(teacher).eval().requires_grad_(True)
    patch = patch_model(student, norm_config)  # no norm to convert, or an option out of range: raises
    record = get_patch_record(student)
    wrapped = wrap_norms(student, blend_sources(record, lambda name: copy.deepcopy(teacher.get_submodule(name))))
    collate = collator(tokenizer, causal)
    eval_loader = DataLoader(data["validation"], batch_size=args.per_device_batch_size, collate_fn=collate)
    teacher.to(accelerator.device)
    probe = next(iter(eval_loader))
    with torch.no_grad():
        objective = choose_objective(args.objective, teacher(**{k: v[:1].to(accelerator.device)
                                                                for k, v in probe.items()}), kind)
    extra = FORWARD_OPTIONS.get(objective, {})  # what the objective reads beyond the default outputs

    student.to(accelerator.device)
    unused = _freeze_unreached(student, teacher, probe, objective, extra, wrapped, accelerator.device)
    naive = measure(student, teacher, eval_loader, accelerator.device, wrapped, causal)  # the swap with no training
    # Logits are the function of an LM (a fold moves the last norm's gain into the head, so its
    # hidden states differ while its predictions do not); for an encoder the hidden state is.
    exact = norm_config.norm in CAN_BE_EXACT and norm_config.eps_mode == "torch" and _unchanged(naive)
    rescaled, start = {}, None
    if args.rescale_post_ln and not exact:
        rescaled, start = _rescale_post_ln(student, teacher, record, probe, wrapped, naive, norm_config,
                                           lambda: measure(student, teacher, eval_loader, accelerator.device,
                                                           wrapped, causal), _recorded_rescale(resume_path))
    targets = (NormTargets(teacher, student, list(rescaled), output_scale(norm_config))
               if rescaled and args.layer_loss_weight > 0 else None)
    total_steps = 0 if exact else args.max_steps
    ramp_steps = int(round(args.ramp_fraction * total_steps))

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)  # decay would pull the student away from the teacher
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
                              num_training_steps=max(total_steps, 1) * accelerator.num_processes)
    train_loader = DataLoader(data["train"], shuffle=True, batch_size=args.per_device_batch_size,
                              collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, train_loader, scheduler = accelerator.prepare(student, optimizer, train_loader, scheduler)

    with ExitStack() as lock:
        if accelerator.is_main_process:  # one conversion per folder; the kernel frees the lock if we are killed
            lock.enter_context(folder_lock(out, "conversion"))
            if check_output_dir(args, accelerator.num_processes, fingerprint, accelerator.mixed_precision,
                                accelerator.distributed_type.value, text_files) != resume_path:
                raise RuntimeError(f"{out} changed while this conversion was being set up: is another process "
                                   "writing there?")
        loop = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "history": [], "naive": naive,
                "rescaled": list(rescaled), "start": start}  # checkpoints keep the start, for the resume
        if resume_path is not None:
            loop = checkpoints.load_checkpoint(accelerator, resume_path)
            accelerator.print(f"resumed from {resume_path} at step {loop['step']}")
        if accelerator.is_main_process:
            if args.overwrite_output_dir and resume_path is None and out.exists():
                for name in OWN_FILES:
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(
                        missing_ok=True)  # a link is removed, never what it points to
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_incomplete(out)
            checkpoints.write_json_atomic(out / ARGS_FILE, args.to_dict())

        progress = progress_bar(accelerator, total=total_steps, initial=loop["step"], desc=f"convert -> {args.norm}")
        model.eval()
        epoch = loop["epoch"]
        while loop["step"] < total_steps:
            for batch in resumed_batches(accelerator, train_loader, loop, epoch):
                set_alphas(wrapped, alphas(args.schedule, loop["step"], ramp_steps, len(wrapped)))
                with accelerator.accumulate(model):
                    with torch.no_grad():
                        target = teacher(**batch, **extra)
                    # the loss through each norm's exact gradient (exact_grad.py); measured as saved
                    with exact_backward(student, args.exact_backward):
                        loss = distill_loss(objective, target, model(**batch, **extra), batch["attention_mask"])
                        if targets is not None:
                            loss = loss + args.layer_loss_weight * targets.loss(batch["attention_mask"])
                        backward_and_step(accelerator, model, loss, optimizer, scheduler, args.max_grad_norm)
                loop["batches_in_epoch"] += 1
                if not accelerator.sync_gradients:
                    continue
                loop["step"] += 1
                progress.update(1)
                mean_alpha = ((sum(b.alpha for b in wrapped.values()) + len(rescaled))
                              / (len(wrapped) + len(rescaled)))
                progress.set_postfix(loss=f"{loss.item():.4f}", alpha=f"{mean_alpha:.2f}")
                if loop["step"] % args.eval_every == 0 or loop["step"] == total_steps:
                    entry = {"step": loop["step"], "loss": loss.item(),
                             "mean_alpha": mean_alpha,
                             **measure(model, teacher, eval_loader, accelerator.device, wrapped, causal)}
                    loop["history"].append(entry)
                if (args.checkpointing_steps and loop["step"] % args.checkpointing_steps == 0
                        and loop["step"] < total_steps):
                    checkpoints.save_checkpoint(accelerator, out, loop["step"], loop, total_limit=1,
                                                run={**checkpoints.run_record(args, accelerator.num_processes, accelerator.mixed_precision,
                                                                                   accelerator.distributed_type.value),
                                                     "teacher_fingerprint": fingerprint, "data_fingerprint": text_files})
                if loop["step"] >= total_steps:
                    break
            epoch += 1
            loop["epoch"], loop["batches_in_epoch"] = epoch, 0
        progress.close()
        if targets is not None:
            targets.remove()

        unwrapped = accelerator.unwrap_model(model)
        unwrap_norms(unwrapped, wrapped)  # only the target norms remain
        final = measure(unwrapped, teacher, eval_loader, accelerator.device, causal=causal)
        result = {"teacher": args.model, "teacher_fingerprint": fingerprint, "norm": norm_config.to_dict(),
                  "objective": objective,
                  "schedule": args.schedule, "steps": total_steps, "exact_without_training": exact,
                  "dataset": args.dataset, "eval_sequences": naive["sequences"], "naive": loop["naive"],
                  "rescaled": rescaled, "start": loop.get("start", start), "start_alpha": len(rescaled) / (len(wrapped) + len(rescaled)),
                  "converted": final, "history": loop["history"], "patch_report": patch.to_dict(),
                  "seconds": time.time() - started, "args": args.to_dict(), "frozen_unreached": unused,
                  "world_size": accelerator.num_processes,
                  "resumed_from": str(resume_path) if resume_path else None,
                  "worse_than_naive": total_steps > 0 and _clearly_farther(final, loop["naive"])}
        if result["worse_than_naive"] and accelerator.is_main_process:
            warnings.warn("the converted model is farther from the original than the naive swap: the "
                          "distillation made it worse (a learning rate too high for this model?); do not use "
                          "it, convert again with a lower --learning_rate", UserWarning)
        state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
        if accelerator.is_main_process:
            save_pretrained(unwrapped, out / MODEL_DIR, state_dict=state_dict, base_model=args.model,
                            metrics=_card_facts(result), is_main_process=True)
            tokenizer.save_pretrained(out / MODEL_DIR)
            write_reports(out, result)  # conversion.json last: its presence means "finished"
            shutil.rmtree(out / checkpoints.CHECKPOINT_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result


def _card_facts(result: dict) -> dict:
    facts = {"teacher": result["teacher"], "distillation data": result["dataset"],
             "schedule": result["schedule"], "distillation steps": result["steps"],
             "objective": result["objective"]}
    for when in ("naive", "converted"):
        for key in ("embedding_cosine", "relative_error", "kl", "agreement"):
            if key in result[when]:
                facts[f"{key} ({'naive swap' if when == 'naive' else 'after conversion'})"] = result[when][key]
    return facts

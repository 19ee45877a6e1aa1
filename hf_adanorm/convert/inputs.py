"""What a conversion refuses before it writes anything: an output folder that holds something else
or overlaps an input, a checkpoint that is not this conversion's, a teacher it cannot convert."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from ..atomic_folder import is_staging_leftover
from ..checkpoint import load_config
from ..sources import check_apart
from ..training import checkpoints
from ..training.locks import LOCK_FILE, OWNER_FILE
from .args import BEFORE_THE_OPTION, DEFAULTS, PATH_OPTIONS, ConvertArgs, local_path
from .fingerprint import check_same_data, check_same_teacher
from .report import ARGS_FILE, MODEL_DIR, OWN_FILES, PLOT_FILE, REPORT_FILE, RESULT_FILE

LOCK_FILES = (LOCK_FILE, OWNER_FILE)  # a conversion's own, kept when --overwrite_output_dir clears the rest


# Heads fine-tuned for a task. A sequence classifier's is distilled and kept (model_kind); loaded as the
# base model, any other's function would be dropped from what is saved. (Pretraining heads, *ForMaskedLM /
# *ForPreTraining, are what fine-tuning discards anyway: such a model is converted as its base model, as
# compare --convert and the recipes then use it.)
TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice",
              "DoubleHeadsModel")


def task_head(config) -> str | None:
    """The first architecture of ``config`` with a head fine-tuned for a task, if any."""
    return next((a for a in (config.architectures or []) if any(h in a for h in TASK_HEADS)), None)


def model_kind(args: ConvertArgs, config) -> str:
    """One of MODEL_CLASSES but 'auto': what the teacher is loaded as, and so what is distilled."""
    if args.model_class != "auto":
        return args.model_class
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence_classification"
    head = task_head(config)
    if head:
        raise ValueError(f"{args.model!r} is a model fine-tuned for a task ({head}): convert keeps the "
                         "function of a causal LM, a sequence classifier or a base model, not of this head. "
                         "Pass --model_class base to convert its base model (the head is not kept: fine-tune "
                         "a new one on the converted model), or --model_class causal_lm to keep a "
                         "language-model head it has")
    return "base"


def _check_classifier(args: ConvertArgs, config) -> None:
    """The classifier objective distils a distribution over classes: one label of several."""
    if config.num_labels < 2 or config.problem_type in ("regression", "multi_label_classification"):
        what = config.problem_type or f"{config.num_labels} label"
        raise ValueError(f"{args.model!r} is a {what} head: convert distils a single-label classifier's class "
                         "probabilities, which a regression or multi-label head does not give. Pass "
                         "--model_class base to convert its base model (the head is not kept)")


def _own_file(name: str) -> bool:
    """A conversion's own file, or what a kill during one of its atomic writes left of it: the
    temporary file of a report or of the lock's owner file (the next write replaces it), or a staging
    folder of the model (the next save deletes it)."""
    written_through_tmp = (RESULT_FILE, ARGS_FILE, REPORT_FILE, PLOT_FILE, OWNER_FILE)
    return (name in OWN_FILES + LOCK_FILES or name.removeprefix(checkpoints.TMP_PREFIX) in written_through_tmp
            or is_staging_leftover(name, MODEL_DIR))


def _check_apart(args: ConvertArgs) -> None:
    """Refuse a local input that is, or lies inside, the output folder, its ``model`` (the final save replaces
    it: the teacher itself, if it is there or linked there) or its ``checkpoints``."""
    out = Path(args.output_dir)
    check_apart({name: getattr(args, name) for name in PATH_OPTIONS},
                [(out, True), (out / MODEL_DIR, True), (out / checkpoints.CHECKPOINT_DIR, True)],
                "this conversion", "output_dir", args.output_dir)


def check_output_dir(args: ConvertArgs, world_size: int = 1, fingerprint: str | None = None,
                     mixed_precision: str | None = None, distributed_type: str | None = None,
                     text_fingerprint: dict | None = None) -> Path | None:
    """The checkpoint to resume from, or None; refuses a folder that holds something else, and a
    checkpoint of another conversion, of another version of the teacher (``fingerprint``) or of other
    text files (``text_fingerprint``)."""
    _check_apart(args)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file: pass a folder")
    if out.is_symlink() and not out.exists():  # mkdir would fail on it only after the teacher is loaded
        raise FileNotFoundError(f"output_dir {out} is a link to {out.readlink()}, which does not exist: create "
                                "that folder, or pass another --output_dir")
    explicit = args.resume_from_checkpoint not in (None, "latest")
    if explicit and not (out / ARGS_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {out} holds no conversion to "
                                f"resume ({ARGS_FILE} is missing); pass the --output_dir of the conversion that "
                                "wrote that checkpoint")
    if not out.exists():
        return None
    foreign = sorted(p.name for p in out.iterdir() if not _own_file(p.name))
    if foreign:
        raise FileExistsError(f"output_dir {out} holds files that are not a conversion's ({', '.join(foreign[:5])}): "
                              "pass an empty or new folder")
    if args.overwrite_output_dir:
        return None
    if (out / RESULT_FILE).exists():
        leftover = (f"; its {checkpoints.CHECKPOINT_DIR}/ is what a kill during the final cleanup left, and can "
                    "be deleted" if (out / checkpoints.CHECKPOINT_DIR).exists() else "")
        raise FileExistsError(f"{out} already holds a finished conversion ({RESULT_FILE}): pass "
                              f"--overwrite_output_dir to redo it, or another --output_dir{leftover}")
    if args.resume_from_checkpoint is None:
        if checkpoints.latest_checkpoint(out) is not None:
            raise FileExistsError(f"{out} holds checkpoints of an interrupted conversion: resume it with "
                                  "--resume_from_checkpoint latest, or pass --overwrite_output_dir")
        return None
    path = (checkpoints.latest_checkpoint(out) if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint))
    if path is None:
        return None
    if not (path / checkpoints.STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: pass a checkpoints/step_N folder or 'latest'")
    # the options of the conversion that wrote the checkpoint: its own record (a checkpoint passed by path
    # may come from another conversion's folder), else, for a checkpoint of this folder from before
    # checkpoints kept one, the folder's
    run = json.loads((path / checkpoints.STATE_FILE).read_text()).get("run")
    own = path.resolve().parent == (out / checkpoints.CHECKPOINT_DIR).resolve()
    if run is None and not own:
        raise ValueError(f"cannot resume {path}: it records no options and is not a checkpoint of {out}, so "
                         "which conversion wrote it cannot be checked; pass 'latest' or a checkpoint of "
                         f"{out / checkpoints.CHECKPOINT_DIR}")
    launch = checkpoints.launch_differences(run or {}, world_size, mixed_precision, distributed_type)
    if launch:
        raise ValueError(f"cannot resume {path}: it was written by another launch ({', '.join(launch)}), which "
                         "would deal, compute or store the batches differently; resume it as it was launched, "
                         "or pass --overwrite_output_dir to start afresh")
    saved = (run["args"] if run is not None
             else json.loads((out / ARGS_FILE).read_text()) if (out / ARGS_FILE).exists() else None)
    # options that do not change the result (checkpoints are saved at the end of a step, so a resume is
    # bitwise the same whatever their spacing)
    ignore = {"resume_from_checkpoint", "overwrite_output_dir", "output_dir", "checkpointing_steps"}
    # an option the saved run predates had its default then (the defaults of options added later
    # reproduce the behaviour before them, except those in BEFORE_THE_OPTION; those that now depend on the
    # norm had the generic one). Runs from before local paths were made absolute saved them as given, which
    # can only be read relative to the current folder.
    defaults = {**{f.name: f.default for f in fields(ConvertArgs)}, **DEFAULTS, **BEFORE_THE_OPTION}
    before = {k: local_path(saved.get(k, defaults[k])) if k in PATH_OPTIONS else saved.get(k, defaults[k])
              for k in args.to_dict()} if saved else {}
    changed = [f"{k}: {before[k]!r} -> {v!r}" for k, v in args.to_dict().items()
               if saved is not None and k not in ignore and before[k] != v]
    if saved is None or changed:
        raise ValueError(f"cannot resume {path}: the conversion there was made with other options "
                         f"({'; '.join(changed) or 'unknown options'}); rerun with the same options, "
                         "or pass --overwrite_output_dir to start afresh")
    if run is not None:  # the same options, so the same --model: is it still the same model?
        check_same_teacher(run.get("teacher_fingerprint"), fingerprint, args.model, f"the checkpoint {path}",
                           "pass --overwrite_output_dir to convert the model as it is now")
        recorded, now = run.get("data_fingerprint") or {}, text_fingerprint or {}
        for option, use in (("dataset", "distil on"), ("eval_dataset", "measure the drift on")):
            check_same_data(recorded.get(option), now.get(option), getattr(args, option), f"the checkpoint {path}",
                            "pass --overwrite_output_dir to convert on the text as it is now", use)
    checkpoints.check_random_states(path, world_size)
    return path


def load_teacher(args: ConvertArgs):
    """The teacher, frozen and in eval mode, and what it was loaded as (:func:`model_kind`)."""
    try:
        config = load_config(args.model)  # an hf_adanorm checkpoint's too (AutoConfig refuses it)
    except Exception as err:  # not a model folder / hub id
        raise ValueError(f"cannot load model {args.model!r} ({type(err).__name__}: {err}); pass a hub id or a "
                         "local folder of a pretrained model") from err
    if getattr(config, "hf_adanorm", None) is not None:
        raise ValueError(f"{args.model!r} is already converted to {config.hf_adanorm['config']['norm']!r}: "
                         "convert the original model")
    kind = model_kind(args, config)
    if kind == "sequence_classification":
        _check_classifier(args, config)
    if kind == "causal_lm" and args.max_length < 2:
        raise ValueError(f"max_length={args.max_length} is too short for a causal LM: a block needs at least 2 "
                         "tokens, one to read and one to predict")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and args.max_length > positions:
        raise ValueError(f"max_length={args.max_length} is more than the {positions} positions {args.model!r} "
                         f"has: pass --max_length {positions} or less")
    auto = {"causal_lm": AutoModelForCausalLM, "base": AutoModel,
            "sequence_classification": AutoModelForSequenceClassification}[kind]
    try:
        teacher = auto.from_pretrained(args.model)
    except Exception as err:
        raise ValueError(f"cannot load {args.model!r} as {auto.__name__} ({type(err).__name__}: {err}); "
                         "set --model_class") from err
    teacher.eval().requires_grad_(False)
    _check_length_fits(teacher, args)
    return teacher, kind


def _check_length_fits(teacher, args: ConvertArgs) -> None:
    """One forward of a single max_length-token sequence. Models count their positions in their own ways
    (RoBERTa's 514 embeddings hold 512 tokens, past its padding offset), so ask the model rather than its
    config: a length it cannot take fails here, before a file is written, not at the first long batch.
    On the CPU, where the teacher is loaded: on a GPU an index out of range is a device-side assert,
    which leaves the CUDA context unusable instead of raising an error that can be explained."""
    token = 1 if teacher.config.pad_token_id == 0 else 0  # not padding: a padding run would not count positions
    try:
        with torch.no_grad():
            teacher(input_ids=torch.full((1, args.max_length), token, dtype=torch.long))
    except (IndexError, RuntimeError) as err:
        raise ValueError(f"{args.model!r} cannot take a sequence of max_length={args.max_length} tokens "
                         f"({type(err).__name__}: {err}); pass a smaller --max_length") from err
    except ValueError as err:  # transformers' refusal of the inputs, e.g. T5 asks for decoder inputs
        raise ValueError(f"{args.model!r} does not run on token ids alone ({err}): convert distils models "
                         "that do, encoders and causal LMs (BART builds its decoder inputs itself; T5 and "
                         "other encoder-decoders that need decoder inputs are not supported)") from err

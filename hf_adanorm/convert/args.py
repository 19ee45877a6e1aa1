"""``ConvertArgs``: every option of ``hf-adanorm convert``, checked before anything runs.

The field help is the command-line help and the documentation of each option; the
target-norm options take theirs, and their defaults, from ``NormConfig``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from os import PathLike, fspath
from typing import Optional, Sequence


from ..config import NormConfig
from ..norms import _is_int, _is_real
from ..registry import available_norms
from ..sources import expand_home
from ..training.args import options_parser
from .distill import OBJECTIVES
from .schedule import SCHEDULES

PATH_OPTIONS = ("model", "tokenizer", "dataset", "eval_dataset")  # hub ids, or local paths made absolute
MODEL_CLASSES = ("auto", "causal_lm", "base", "sequence_classification")
DEFAULT_SCHEDULE = "blend"  # the measured winner: docs/conversion.md
NORM_OPTIONS = ("k", "C", "detach", "eps_mode", "include_rmsnorm", "include", "exclude", "fold_affine")
# The options whose default depends on the target norm, and their values. AdaNorm starts much farther
# from the original than the other norms (its factor 1 - k y is not the identity): on MiniLM it gained
# from larger steps and from a heavier per-norm target, where layernorm_simple was level at 5e-4 and
# unstable at 1e-3 (docs/conversion.md). Batches of 16 over 1600 steps brought AdaNorm's embeddings closer
# (0.906 against 0.893), but fine-tuning from that conversion was 1.8 points below the baseline, against
# 0.2 from the default's: not the default (docs/conversion.md).
DEFAULTS = {"learning_rate": 2e-4, "layer_loss_weight": 1.0}
DEFAULTS_BY_NORM = {"adanorm": {"learning_rate": 5e-4, "layer_loss_weight": 10.0}}


# What a run recorded before an option existed behaved as (a resume compares the saved options with these
# for the ones its file lacks): runs before exact_backward distilled through the detached backward.
BEFORE_THE_OPTION = {"exact_backward": False}


def local_path(value):
    """A local file or folder as its absolute path (one spelling per folder: 'm', './m/' and /abs/m are the
    same teacher, 'm' from another working folder is not); anything else, such as a hub id, as it is."""
    value = expand_home(value)
    if isinstance(value, str) and value and os.path.exists(value):
        absolute = os.path.abspath(value)
        # abspath drops 'link/..' as text, where the kernel goes up from the link's target: refuse a path
        # whose two readings are two places, rather than record (and load) another one than was meant
        if os.path.realpath(absolute) != os.path.realpath(value):
            raise ValueError(f"the path {value!r} leads to {os.path.realpath(value)}, but reads as {absolute} "
                             "(a '..' after a link): pass the folder's own path")
        return absolute
    return value


def default_for(option: str, norm: str) -> float:
    return DEFAULTS_BY_NORM.get(norm, {}).get(option, DEFAULTS[option])


def _help(text: str) -> dict:
    return {"help": text}


def _norm_option(name: str, default=None, note: str = ""):
    spec = next(f for f in fields(NormConfig) if f.name == name)
    value = spec.default if default is None else default
    return field(default=value, metadata={"help": spec.metadata["help"] + note})


@dataclass
class ConvertArgs:
    model: Optional[str] = field(default=None, metadata=_help(
        "The pretrained model to convert (the teacher): hub id or local folder."))
    tokenizer: Optional[str] = field(default=None, metadata=_help("Tokenizer hub id or folder; default: the model's."))
    model_class: str = field(default="auto", metadata=_help(
        "'causal_lm' (AutoModelForCausalLM: distil next-token distributions), 'base' (AutoModel: distil "
        "the last hidden state and the mean-pooled embedding), 'sequence_classification' "
        "(AutoModelForSequenceClassification: distil its class probabilities and its encoder's last hidden "
        "state; the head is kept) or 'auto' (causal_lm when the model's config names a *ForCausalLM / "
        "*LMHeadModel architecture, sequence_classification for a *ForSequenceClassification, "
        "base for a base model, a pretraining head or "
        "none; a model with another task head (token classification, question answering ...) is refused: "
        "pass 'base' to convert its base model and drop the head)."))
    dataset: Optional[str] = field(default=None, metadata=_help(
        "Unlabeled text to distil on: a hub dataset id, a csv/json/jsonl/txt file, or a folder of "
        "train.* / validation.* files or of .txt files (as the recipes take it). Labels are ignored."))
    dataset_config: Optional[str] = field(default=None, metadata=_help("Hub dataset configuration name."))
    text_column: str = field(default="text", metadata=_help("Column holding the text."))
    validation_fraction: float = field(default=0.05, metadata=_help(
        "Share of the text held out to measure the drift, when the dataset has no validation split."))
    split_seed: int = field(default=0, metadata=_help("Seed of that hold-out split."))
    eval_dataset: Optional[str] = field(default=None, metadata=_help(
        "Text to measure the drift on instead of the held-out part of --dataset, e.g. your task's test "
        "text: a file, or a folder whose test.* (else validation.*, else every) file is used."))
    max_eval_samples: int = field(default=256, metadata=_help(
        "Held-out examples (encoders) or blocks (causal LMs) the drift is measured on."))
    norm: str = field(default="adanorm", metadata=_help(
        "The target norm: " + ", ".join(n for n in ("layernorm_simple", "adanorm", "detachnorm", "no_norm"))
        + " (see hf_adanorm.available_norms())."))
    k: float = _norm_option("k")
    C: float = _norm_option("C")
    detach: str = _norm_option("detach")
    eps_mode: str = _norm_option("eps_mode")
    include_rmsnorm: bool = _norm_option("include_rmsnorm")
    include: Optional[str] = field(default=None, metadata=_help(
        "Only convert the norms whose full module name matches this regular expression."))
    exclude: Optional[str] = field(default=None, metadata=_help(
        "Never convert the norms whose full module name matches this regular expression."))
    fold_affine: bool = _norm_option("fold_affine", default=True, note=(
        " On by default here: every exact fold is applied before training, so a pre-LN model "
        "converted to layernorm_simple needs no training at all."))
    rescale_post_ln: bool = field(default=True, metadata=_help(
        "Start each post-LN norm (one whose output also feeds the residual stream, as in BERT) from a "
        "rescaled student instead of the naive swap: its gain and bias go into the Linear layers that read "
        "it, and the residual writer after it is rescaled (hf_adanorm/convert/rescale.py). Such norms are "
        "swapped at step 0; the schedule blends the others. Measured on MiniLM: a much closer start "
        "and a better end (docs/conversion.md)."))
    layer_loss_weight: Optional[float] = field(default=None, metadata=_help(
        "Weight of a per-norm target for the rescaled post-LN norms, added to the objective: each one's "
        "output, mapped back through the original gain and bias, should match the original norm's output "
        "(1 − cosine per token, averaged over norms). 0 turns it off. Default: "
        f"{DEFAULTS_BY_NORM['adanorm']['layer_loss_weight']:g} for adanorm, {DEFAULTS['layer_loss_weight']:g} "
        "for the other norms (measured on MiniLM: docs/conversion.md)."))
    exact_backward: bool = field(default=True, metadata=_help(
        "Distil with the exact gradient of each target norm's forward. AdaNorm detaches its factor "
        "C(1 - k y) in backward, and DetachNorm its statistics: that is how a model trains with them "
        "(fine-tuning the converted model keeps it), but it is not the gradient of the distillation loss. "
        "The saved model is the same norm either way. Measured on MiniLM -> AdaNorm: a closer conversion "
        "(docs/conversion.md); False reproduces conversions made before this option."))
    schedule: str = field(default=DEFAULT_SCHEDULE, metadata=_help(
        "How the norms are swapped while distilling: 'blend' (every norm's output blended from the "
        "original to the new one together), 'layerwise' (one norm after another, in module order) or "
        "'swap' (all at once at the start). See docs/conversion.md for the measured comparison."))
    ramp_fraction: float = field(default=0.5, metadata=_help(
        "Share of the steps over which the schedule ramps the norms in; the rest distils the fully "
        "converted model."))
    objective: str = field(default="auto", metadata=_help(
        "'logits' (KL of the teacher's to the student's token distributions), 'hidden' (cosine of the "
        "last hidden state per token and of the mean-pooled embedding), 'classifier' (a sequence "
        "classifier: KL of its class probabilities plus 'hidden' on its encoder's output) or 'auto' "
        "(classifier for a sequence classifier, else logits when the model has them, else hidden)."))
    max_steps: int = field(default=600, metadata=_help("Optimizer steps of distillation."))
    per_device_batch_size: int = field(default=32, metadata=_help("Texts (or blocks) per step and process."))
    max_length: int = field(default=64, metadata=_help(
        "Encoders: truncate each text to this many tokens. Causal LMs: the length of each block."))
    learning_rate: Optional[float] = field(default=None, metadata=_help(
        f"Peak learning rate of AdamW. Default: {DEFAULTS_BY_NORM['adanorm']['learning_rate']:g} for adanorm, "
        f"{DEFAULTS['learning_rate']:g} for the other norms (measured on MiniLM: docs/conversion.md)."))
    warmup_steps: int = field(default=20, metadata=_help("Linear warm-up steps; then linear decay to 0."))
    max_grad_norm: Optional[float] = field(default=1.0, metadata=_help(
        "Clip the global gradient norm to this (> 0); 'none' on the command line (None from Python, null in "
        "JSON options) turns clipping off."))
    eval_every: int = field(default=50, metadata=_help("Measure the drift every N steps (and at the end)."))
    seed: int = field(default=0, metadata=_help("Seed of the data order and dropout."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    mixed_precision: Optional[str] = field(default=None, metadata=_help("'no', 'bf16' or 'fp16' (GPU only)."))
    checkpointing_steps: Optional[int] = field(default=100, metadata=_help(
        "Save the full state every N steps into output_dir/checkpoints (resumable after a kill); None (from "
        "Python, or null in JSON options) saves none."))
    resume_from_checkpoint: Optional[str] = field(default="latest", metadata=_help(
        "A checkpoint folder, 'latest' (default: continue an interrupted conversion in output_dir, "
        "else start afresh) or 'none'."))
    output_dir: str = field(default="outputs/convert", metadata=_help(
        "Where model/ (the converted model), conversion.json, conversion.md, drift.png and "
        "checkpoints/ go."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Replace a finished conversion in output_dir (its conversion.json, model/ and checkpoints/)."))
    cpu: bool = field(default=False, metadata=_help("Run on CPU even if a GPU is present."))

    def __post_init__(self):
        for name in ("model", "tokenizer", "dataset", "eval_dataset", "output_dir", "resume_from_checkpoint"):
            if isinstance(getattr(self, name), PathLike):
                setattr(self, name, fspath(getattr(self, name)))
        if not self.model:
            raise ValueError("no model: pass --model with a hub id or a local folder of a pretrained model")
        if not self.dataset:
            raise ValueError("no text: pass --dataset with a hub dataset id or a local csv/json/txt file or folder")
        if not self.output_dir or not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: pass --output_dir with a folder for the converted model")
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {self.model_class!r}")
        if self.norm not in available_norms():
            raise ValueError(f"unknown target norm {self.norm!r}: choose one of {available_norms()} "
                             "('layernorm' is the model as it is: there is nothing to convert)")
        self.norm_config()  # k, C, detach, eps_mode and the patterns are checked by NormConfig
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("max_steps", "per_device_batch_size", "max_length", "eval_every", "max_eval_samples",
                     "gradient_accumulation_steps", "checkpointing_steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if not (_is_int(value) and 0 <= value < 2 ** 32):
                raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
        for name in ("rescale_post_ln", "exact_backward", "overwrite_output_dir", "cpu"):
            if not isinstance(getattr(self, name), bool):  # "no" from a JSON option is not False
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in DEFAULTS:
            if getattr(self, name) is None:
                setattr(self, name, default_for(name, self.norm))
        # _is_real: a finite number, not a bool (True would pass as 1) nor a string from a JSON option
        if not (_is_real(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate!r}")
        if self.max_grad_norm is not None and not (_is_real(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {self.max_grad_norm!r}")
        if not (_is_real(self.layer_loss_weight) and self.layer_loss_weight >= 0):
            raise ValueError(f"layer_loss_weight must be a finite number >= 0, got {self.layer_loss_weight!r}")
        if not (_is_real(self.ramp_fraction) and 0 <= self.ramp_fraction <= 1):
            raise ValueError(f"ramp_fraction must be in [0, 1], got {self.ramp_fraction!r}")
        if not (_is_real(self.validation_fraction) and 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.resume_from_checkpoint in ("none", "None", ""):
            self.resume_from_checkpoint = None
        if self.overwrite_output_dir and self.resume_from_checkpoint not in (None, "latest"):
            raise ValueError("--overwrite_output_dir starts the conversion afresh, so it cannot resume from "
                             f"{self.resume_from_checkpoint}: pass one or the other")
        for name in PATH_OPTIONS:  # a resume then compares the folder, not how it was written
            setattr(self, name, local_path(getattr(self, name)))
        self.output_dir, self.resume_from_checkpoint = map(expand_home, (self.output_dir, self.resume_from_checkpoint))

    def norm_config(self) -> NormConfig:
        return NormConfig(norm=self.norm, **{name: getattr(self, name) for name in NORM_OPTIONS})

    def to_dict(self) -> dict:
        return asdict(self)


def parse_args(argv: Optional[Sequence[str]] = None) -> ConvertArgs:
    parser = options_parser(ConvertArgs)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        parser.error(str(err))
    return args

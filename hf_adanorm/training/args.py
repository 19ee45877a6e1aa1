"""``TrainingArgs``: every option of a training run, checked before anything runs.

The field help is the command-line help (the recipes parse this dataclass with
``transformers.HfArgumentParser``, see :func:`parse_args`) and the documentation of
each option; the norm options take theirs, and their defaults, from ``NormConfig``.
"""

from __future__ import annotations

import json
from os import PathLike, fspath
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

from transformers import HfArgumentParser

from ..config import NormConfig
from ..norms import _is_int, _is_real
from ..registry import available_norms
from ..sources import check_model_source, expand_home

BASELINE = "layernorm"  # the unpatched model
TASKS = ("classification", "causal_lm")
BUILT_TOKENIZERS = ("char", "word")
PATH_OPTIONS = ("model", "tokenizer", "dataset", "output_dir", "resume_from_checkpoint")  # '~' is expanded
# accelerate 1.x has no fp16 autocast on CPU: it would train in fp32 and still report fp16
FP16_ON_CPU = ("fp16 mixed precision needs a GPU (on CPU accelerate trains in fp32 while reporting fp16); "
               "on CPU use --mixed_precision bf16 (CPU autocast) or no")


# transformers schedulers that train with the loop's get_scheduler(name, warm-up, total steps)
# call; the others need extra arguments (min_lr, num_decay_steps) or a metric at each step.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
MAX_SEED = 2**32 - 1  # numpy's np.random.seed (which accelerate's set_seed calls) takes 0 .. 2**32 - 1

NORM_OPTIONS = ("k", "C", "detach", "eps_mode", "include_rmsnorm", "fold_affine")  # passed on to NormConfig as they are


def _help(text: str) -> dict:
    return {"help": text}


def _norm_option(name: str):
    """A field that goes straight to NormConfig: same default, same help (one source of truth)."""
    spec = next(f for f in fields(NormConfig) if f.name == name)
    return field(default=spec.default, metadata=spec.metadata)


def float_or_none(text: str) -> float | None:
    """A command-line number, or 'none' / 'None' / 'null' for None (an option whose None means 'off')."""
    return None if text.strip().lower() in ("none", "null") else float(text)


NONE_MEANS_OFF = ("max_grad_norm",)  # numbers whose None turns something off


def options_parser(dataclass_type, **kwargs) -> HfArgumentParser:
    """HfArgumentParser of ``dataclass_type``, where NONE_MEANS_OFF options also take 'none' (it parses an
    Optional[float] as a float, so None could be given from Python and JSON only), and each --no_X flag
    says what it does (it repeated the help of --X)."""
    parser = HfArgumentParser(dataclass_type, **kwargs)
    for action in parser._actions:
        if action.dest in NONE_MEANS_OFF:
            action.type = float_or_none
        if any(option.startswith("--no_") for option in action.option_strings):  # it copies the option's help
            action.help = f"Turn --{action.dest} off (the last of the two on the command line wins)."
    return parser


def check_sources(model: str, tokenizer: str | None = None) -> None:
    """Refuse a --model or --tokenizer that names nothing this machine can load (a path that does not
    exist; offline, an uncached hub id), naming it, before anything is loaded or written."""
    if not model.startswith("config:"):
        check_model_source("model", model)
    if tokenizer is not None and tokenizer not in BUILT_TOKENIZERS:
        check_model_source("tokenizer", tokenizer)


@dataclass
class TrainingArgs:
    task: str = field(default="classification", metadata=_help(
        "'classification' (AutoModelForSequenceClassification) or 'causal_lm' (AutoModelForCausalLM)."))
    model: Optional[str] = field(default=None, metadata=_help(
        "Hub id or local folder of a pretrained model, or 'config:<model_type>' (e.g. 'config:gpt2') "
        "for a randomly initialised model built from that architecture's config (from-scratch runs)."))
    model_config: Optional[str] = field(default=None, metadata=_help(
        "Config overrides as a JSON object (or a dict from Python), e.g. "
        "'{\"num_hidden_layers\": 2, \"hidden_size\": 64}'. Applied to pretrained configs too."))
    tokenizer: Optional[str] = field(default=None, metadata=_help(
        "Hub id or folder of a tokenizer; default: the model's own. 'char' or 'word' builds a "
        "character-level or whitespace-word-level vocabulary from the training text (needed for "
        "'config:' models, which have no tokenizer)."))
    dataset: Optional[str] = field(default=None, metadata=_help(
        "Hub dataset id, or a local csv/json/jsonl/txt file, or a folder holding "
        "train.* / validation.* / test.* files (or only .txt files)."))
    dataset_config: Optional[str] = field(default=None, metadata=_help(
        "Hub dataset configuration name, e.g. 'sst2' for 'glue'."))
    text_column: str = field(default="text", metadata=_help("Column holding the input text."))
    text_pair_column: Optional[str] = field(default=None, metadata=_help(
        "Second text column for sentence-pair classification (e.g. 'sentence2')."))
    label_column: str = field(default="label", metadata=_help(
        "Column holding the class label (classification only); strings are mapped to class ids."))
    eval_metrics: list[str] = field(default_factory=list, metadata=_help(
        "Classification only: further metrics from the `evaluate` library, each by local path (a metric "
        "script or its folder; works offline) or hub name (e.g. 'matthews_correlation': fetched once, "
        "so online). Computed from the predictions and labels beside the built-in accuracy and F1; each "
        "number it returns becomes a metric (eval_<key>, test_<key>; <name>_<key> where the key is taken)."))
    validation_fraction: float = field(default=0.1, metadata=_help(
        "Share of the training split held out for evaluation when the dataset has no validation split."))
    split_seed: int = field(default=0, metadata=_help(
        "Seed of that hold-out split; fixed apart from `seed` so every seed sees the same eval set."))
    max_train_samples: Optional[int] = field(default=None, metadata=_help(
        "Keep only the first N training examples (quick runs)."))
    max_eval_samples: Optional[int] = field(default=None, metadata=_help(
        "Keep only the first N validation/test examples (quick runs)."))
    norm: str = field(default=BASELINE, metadata=_help(
        "'layernorm' trains the model as it is (the baseline); any other name is patched in with "
        "hf_adanorm.patch_model before accelerator.prepare: " "see hf_adanorm.available_norms()."))
    k: float = _norm_option("k")
    C: float = _norm_option("C")
    detach: str = _norm_option("detach")
    eps_mode: str = _norm_option("eps_mode")
    include_rmsnorm: bool = _norm_option("include_rmsnorm")
    fold_affine: bool = _norm_option("fold_affine")  # the layernorm baseline keeps its norms: nothing to fold
    seed: int = field(default=0, metadata=_help("Seed of initialisation, data order and dropout."))
    num_epochs: int = field(default=3, metadata=_help("Passes over the training data."))
    max_steps: Optional[int] = field(default=None, metadata=_help(
        "Stop after this many optimizer steps (overrides num_epochs when smaller)."))
    per_device_batch_size: int = field(default=16, metadata=_help(
        "Batch size per process; the global batch is this x processes x gradient_accumulation_steps."))
    eval_batch_size: Optional[int] = field(default=None, metadata=_help(
        "Evaluation batch size per process (default: per_device_batch_size)."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW."))
    weight_decay: float = field(default=0.0, metadata=_help(
        "AdamW weight decay, >= 0; as transformers.Trainer does, never applied to biases or to the gains and "
        "biases of norms (so that the baseline's LayerNorms and the patched norms are treated alike)."))
    lr_scheduler: str = field(default="linear", metadata=_help(
        f"transformers scheduler name, one of {', '.join(SCHEDULERS)}."))
    warmup_steps: int = field(default=0, metadata=_help("Learning-rate warm-up steps."))
    max_grad_norm: Optional[float] = field(default=1.0, metadata=_help(
        "Clip the global gradient norm to this, > 0; 'none' on the command line (None from Python, null in "
        "JSON options): no clipping."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Micro-batches per optimizer step."))
    mixed_precision: Optional[str] = field(default=None, metadata=_help(
        "'no', 'fp16' or 'bf16' (autocast; the weights stay fp32). Default: what `accelerate launch` / the "
        "accelerate config says, else 'no'. On CPU only 'bf16' autocasts: 'fp16' is refused there."))
    max_length: int = field(default=128, metadata=_help(
        "Classification: truncate inputs to this many tokens. Causal LM: length of each training block."))
    eval_every: int = field(default=1, metadata=_help(
        "Evaluate every N epochs (and always at the end)."))
    checkpointing_steps: Optional[int] = field(default=None, metadata=_help(
        "Save the full training state (accelerator.save_state) every N optimizer steps."))
    checkpoints_total_limit: Optional[int] = field(default=None, metadata=_help(
        "Keep only the newest N checkpoints."))
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help(
        "A checkpoint folder, or 'latest' for the newest complete one in output_dir (a fresh start "
        "if there is none)."))
    output_dir: str = field(default="outputs/run", metadata=_help(
        "Where checkpoints/, metrics.json, run_config.json and the final model/ go."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Start afresh in an output_dir that holds another run, deleting its checkpoints/, model/ "
        "and metrics.json. Without it such a folder is refused (unless resuming)."))
    save_model: bool = field(default=True, metadata=_help("Save the final model into output_dir/model."))
    cpu: bool = field(default=False, metadata=_help(
        "Train on CPU even if a GPU is present (multi-process CPU runs use gloo)."))

    def __post_init__(self):
        for name in PATH_OPTIONS:
            if isinstance(getattr(self, name), PathLike):  # pathlib paths from Python callers
                setattr(self, name, fspath(getattr(self, name)))
            setattr(self, name, expand_home(getattr(self, name)))
        if isinstance(self.model_config, str):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"model_config must be a JSON object, got {self.model_config!r}: {err}") from None
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config must be a JSON object / dict, got {self.model_config!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.model:
            raise ValueError("no model: pass --model with a hub id, a local folder or 'config:<model_type>'")
        if not self.dataset:
            raise ValueError("no dataset: pass --dataset with a hub id or a local csv/json/txt file or folder")
        if self.model.startswith("config:") and self.tokenizer is None:
            raise ValueError(f"{self.model!r} has no tokenizer: pass --tokenizer 'char', 'word' or a "
                             "tokenizer hub id / folder")
        self.norm_config()  # an unknown norm or a bad k / C fails here, listing the choices
        positive = ("num_epochs", "per_device_batch_size", "gradient_accumulation_steps", "max_length",
                    "eval_every", "max_steps", "checkpointing_steps", "checkpoints_total_limit",
                    "eval_batch_size", "max_train_samples", "max_eval_samples")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not _is_int(value):  # 1.5 or True would run, as 1 or with a float count
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._check_numbers()
        if not self.output_dir or not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: pass --output_dir with a folder for the run")
        if Path(self.output_dir).expanduser().exists() and not Path(self.output_dir).expanduser().is_dir():
            raise ValueError(f"output_dir {self.output_dir!r} is a file, not a folder: pass another --output_dir")
        self.eval_metrics = [self.eval_metrics] if isinstance(self.eval_metrics, str) else list(self.eval_metrics or [])
        if self.eval_metrics and self.task != "classification":
            raise ValueError("eval_metrics are computed from class predictions: classification only")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.cpu and self.mixed_precision == "fp16":
            raise ValueError(FP16_ON_CPU)

    def _check_numbers(self) -> None:
        """The optimisation options: each of these, left unchecked, trains wrong or fails deep inside
        torch / numpy (a negative clipping norm ascends the gradient, a negative seed crashes numpy)."""
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= MAX_SEED:
                raise ValueError(f"{name} must be an integer from 0 to 2**32 - 1 (numpy's seed range), got {value!r}")
        # _is_real: a finite number, not a bool (True would pass as 1) nor a string from a JSON option
        if not (_is_real(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.max_grad_norm is not None and not (_is_real(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, or None for no clipping; got "
                             f"{self.max_grad_norm!r} (a negative norm would ascend the gradient, 0 would "
                             "zero every step)")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; choose one of {SCHEDULERS}")

    def check_sources(self) -> None:
        check_sources(self.model, self.tokenizer)

    def norm_config(self) -> Optional[NormConfig]:
        """The patch to apply, or None for the LayerNorm baseline."""
        if self.norm == BASELINE:
            return None
        if self.norm not in available_norms():
            raise ValueError(f"unknown norm {self.norm!r}; choose {BASELINE!r} (the unpatched baseline) "
                             f"or one of {available_norms()}")
        return NormConfig(norm=self.norm, **{name: getattr(self, name) for name in NORM_OPTIONS})

    def to_dict(self) -> dict:
        return asdict(self)


def parse_args(task: str, argv: Optional[Sequence[str]] = None) -> TrainingArgs:
    """A recipe's command line (``argv``, default ``sys.argv[1:]``) as checked TrainingArgs.

    ``--task`` defaults to ``task``; ``--help`` lists every option; a bad option exits
    with the usage and the reason (status 2), before anything runs.
    """
    parser = options_parser(TrainingArgs)
    parser.set_defaults(task=task)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArgs checks every option as it is built
        parser.error(str(err))
    return args

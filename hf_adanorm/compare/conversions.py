"""``hf-adanorm compare --convert``: every non-baseline arm starts from a converted model.

Swapping the norms of a pretrained model changes its function, so a comparison would
measure the damage of the swap rather than the norm. With ``--convert`` each norm's
model is first converted once (``hf_adanorm.convert``: distilled from the original while
the norms are blended in) and every seed of that arm fine-tunes the converted model; the
baseline fine-tunes the original. Conversions live in ``<sweep>/conversions/<norm>-<key>/``,
``key`` a hash of every conversion option, and are reused and resumed like the runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from tqdm.auto import tqdm

from ..training.args import BASELINE, TrainingArgs

CONVERSIONS_DIR = "conversions"
# model_config options that change training only (BERT's *_dropout_prob, GPT-2's *_pdrop, layer drop ...)
DROPOUT_OPTIONS = re.compile(r"dropout|pdrop|layerdrop|drop_path")
# Options of a training run that a conversion of the same model takes as they are.
SHARED_WITH_TRAINING = ("model", "tokenizer", "dataset", "dataset_config", "text_column", "k", "C", "detach",
                        "eps_mode", "include_rmsnorm", "max_length", "cpu", "mixed_precision", "validation_fraction",
                        "split_seed")
# Of those, the ones a conversion must share with the runs: the teacher, and the options of the norm.
SET_BY_THE_SWEEP = ("model", "tokenizer", "k", "C", "detach", "eps_mode", "include_rmsnorm")


def conversion_args(setup: dict, norm: str, conversion: dict, folder: Path):
    """The ConvertArgs of ``norm``'s conversion: the sweep's model, text and norm options, then
    the ``conversion`` overrides (e.g. max_steps, schedule, dataset)."""
    from ..convert import ConvertArgs

    options = {k: setup[k] for k in SHARED_WITH_TRAINING if k in setup}
    # the runs' values when the sweep leaves them at their defaults (convert's own differ): the same length,
    # and the same held-out split, so that no sentence the runs evaluate on was distilled on for some arms
    for name in ("max_length", "validation_fraction", "split_seed"):
        options.setdefault(name, getattr(TrainingArgs, name))
    if setup.get("task") == "causal_lm":
        options["model_class"] = "causal_lm"
    elif setup.get("task", "classification") == "classification":
        options["model_class"] = "base"  # the encoder under the classification head
    options.update(conversion)
    try:
        return ConvertArgs(**dict(options, norm=norm, output_dir=str(folder)))
    except TypeError as err:  # an option ConvertArgs does not have
        raise ValueError(f"--convert-options: {err}; see `hf-adanorm convert --help` for the options") from None


def conversion_key(args) -> str:
    options = {k: v for k, v in args.to_dict().items()
               if k not in ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]


def plan_conversions(setup: dict, norms, output_dir, conversion: dict) -> dict:
    """{norm: ConvertArgs} for every non-baseline norm; checks every option before anything runs."""
    if not setup.get("model") or str(setup["model"]).startswith("config:"):
        raise ValueError("--convert needs a pretrained --model: a model built from a config has learned "
                         "nothing to keep")
    per_arm = sorted({"norm", "output_dir"} & set(conversion))
    if per_arm:
        raise ValueError(f"--convert-options cannot set {per_arm}: the sweep sets them per norm")
    fixed = sorted(set(conversion) & set(SET_BY_THE_SWEEP))
    if fixed:
        raise ValueError(f"--convert-options cannot set {fixed}: the conversion takes them from the sweep (its "
                         "--model, --tokenizer and norm options), so that every run fine-tunes the model it was "
                         "converted for and the baseline starts from the same teacher; set them on the sweep")
    _refuse_a_task_model(setup["model"])
    changed = sorted(k for k in (setup.get("model_config") or {}) if not DROPOUT_OPTIONS.search(k))
    if changed:  # dropout changes training only; anything else, the function the conversion kept
        raise ValueError(f"--convert with --model_config {changed}: the conversion keeps the model's function as "
                         "saved, which these options change after it, so the reported starting drift would "
                         "describe another model; leave them out (dropout settings are allowed)")
    plans = {}
    for norm in norms:
        if norm == BASELINE:
            continue
        args = conversion_args(setup, norm, conversion, Path(output_dir) / CONVERSIONS_DIR / "unset")
        args.output_dir = str(Path(output_dir) / CONVERSIONS_DIR / f"{norm}-{conversion_key(args)}")
        plans[norm] = args
    return plans


def _refuse_a_task_model(model: str) -> None:
    """A model fine-tuned for a task keeps its trained head in the baseline, while the converted arms,
    whose conversion keeps the base model, would start from a fresh one: not a fair comparison."""
    from ..checkpoint import load_config
    from ..convert.inputs import task_head

    try:
        config = load_config(model)
    except Exception:  # not loadable here: the conversion says why, before it writes anything
        return
    head = task_head(config)
    if head:
        raise ValueError(f"--convert: {model!r} is fine-tuned for a task ({head}); its converted arms would start "
                         "from the base model with a fresh head while the baseline keeps the trained one. "
                         "Compare from the base model it was fine-tuned from")


def run_conversions(plans: dict, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert each arm's model unless already done (``overwrite``: again, whatever is there); returns
    {norm: conversion result}."""
    from ..convert import convert_model
    from ..convert.report import RESULT_FILE

    results = {}
    for norm, args in tqdm(plans.items(), desc="conversions", unit="norm", disable=not progress):
        done = Path(args.output_dir) / RESULT_FILE
        if overwrite:  # convert checks everything before it clears its folder
            convert_model(dataclasses.replace(args, overwrite_output_dir=True))
        elif not done.is_file():
            convert_model(args)  # resumes an interrupted conversion from its checkpoint
        results[norm] = json.loads(done.read_text())
    return results


def check_conversions_current(plans: dict) -> None:
    """Refuse, before anything runs, to reuse a finished conversion of another version of the teacher
    (the model saved again at its path since): its arm would start from the old model while the
    baseline fine-tunes the new one."""
    from ..convert.fingerprint import check_same_teacher, model_fingerprint
    from ..convert.report import RESULT_FILE

    fingerprint = None
    for norm, args in plans.items():
        done = Path(args.output_dir) / RESULT_FILE
        if done.is_file():
            fingerprint = fingerprint or model_fingerprint(args.model, args.tokenizer)  # as convert takes it
            check_same_teacher(json.loads(done.read_text()).get("teacher_fingerprint"), fingerprint, args.model,
                               f"the {norm} conversion in {done.parent}", "pass --overwrite_output_dir to "
                               "start the sweep afresh (its conversions too), or use another --output-dir")


def check_runs_fit(plans: dict, output_dir) -> None:
    """Refuse when an arm's finished runs fine-tuned another conversion than the one planned now. sweep.json
    holds the conversion options as given, so a change of convert's defaults (a new version) would
    otherwise convert again and add runs from the new conversion to a report of runs from the old one."""
    from ..training.checkpoints import METRICS_FILE
    from .sweep import finished_runs

    for norm, args in plans.items():
        planned = Path(args.output_dir).name  # <norm>-<key>: the folder, however the sweep path is spelled
        for run in finished_runs(output_dir, norm):
            started = json.loads((run / METRICS_FILE).read_text()).get("config", {}).get("model", "")
            if Path(started).parent.name != planned:
                raise ValueError(f"{run} fine-tuned the conversion {started}, but the {norm} conversion of this "
                                 f"sweep is now {planned} (its options, or convert's defaults, differ): pass "
                                 "--overwrite_output_dir to start the sweep afresh, or use another --output-dir")


def converted_model(args) -> str:
    from ..convert.loop import MODEL_DIR
    return str(Path(args.output_dir) / MODEL_DIR)


def starting_drift_table(results: dict, baseline_in: bool) -> list[str]:
    """Markdown: each arm's function at the start of fine-tuning, against the original model."""
    if not results:
        return []
    first = next(iter(results.values()))
    key, label = (("kl", "KL(original ‖ arm), nats/token") if "kl" in first["converted"]
                  else ("embedding_cosine", "embedding cosine to the original"))
    lines = ["## Starting point of each arm", "",
             "Each non-baseline arm fine-tunes a converted model (`--convert`); the figures below are its "
             f"{label} on held-out text before fine-tuning: after the naive swap and after the conversion.", "",
             "| norm | naive swap | converted (start of fine-tuning) | conversion steps | schedule |",
             "|---|---|---|---|---|"]
    if baseline_in:
        lines.append(f"| {BASELINE} | (the original) | {'0' if key == 'kl' else '1'} | | |")
    for norm, r in results.items():
        lines.append(f"| {norm} | {r['naive'][key]:.4g} | {r['converted'][key]:.4g} | {r['steps']} | {r['schedule']} |")
    return lines + [""]

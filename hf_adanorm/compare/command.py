"""The ``hf-adanorm compare`` subcommand: sweep options, plus every training option passed through."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

PER_RUN = ("norm", "seed", "output_dir", "overwrite_output_dir")  # set by the sweep per run, never shared

DESCRIPTION = """\
Train the same model once per norm and seed, then write a report comparing them
(mean ± std, 95% CI, paired tests against the unpatched layernorm baseline, plots).
Finished runs are skipped, so rerunning an interrupted command resumes it.
With neither --model nor --dataset: the built-in demo (scikit-learn's handwritten digits,
a 2-layer BERT from a config; no network, a few minutes on 2 CPU cores).
Every other option below is a training option shared by all runs (see TrainingArgs)."""


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``hf-adanorm`` subcommands."""
    from ..training.args import options_parser

    from ..training.args import TrainingArgs
    from .default import DEFAULT_NORMS, DEFAULT_SEEDS
    from .sweep import known_norms

    # The training options come from TrainingArgs itself, through HfArgumentParser, so the
    # two never drift apart; our own options replace the per-run ones ("resolve").
    training = options_parser(TrainingArgs, add_help=False)
    p = subparsers.add_parser("compare", parents=[training], conflict_handler="resolve",
                              help="train norms x seeds and report how they compare",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = {f.name for f in fields(TrainingArgs)} - set(PER_RUN)
    for action in p._actions:  # noqa: SLF001 (argparse has no public way to reset defaults)
        if action.dest in shared:
            action.default = argparse.SUPPRESS  # only options the user gives reach the runs
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--norms", nargs="+", choices=known_norms(), default=list(DEFAULT_NORMS),
                       metavar="NORM", help=f"norms to compare, from {known_norms()} "
                       f"(default: {' '.join(DEFAULT_NORMS)})")
    sweep.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), metavar="SEED",
                       help="seeds; runs are paired by seed (default: 0 1 2)")
    sweep.add_argument("--output-dir", "--output_dir", dest="output_dir", default="outputs/compare",
                       help="sweep folder: runs/<norm>_seed<seed>/ and report/ (default: %(default)s)")
    sweep.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                       help="train each run in this process, or through `accelerate launch`")
    sweep.add_argument("--accelerate-config", "--accelerate_config", dest="accelerate_config",
                       help="accelerate config file for --launcher accelerate (e.g. recipes/configs/*.yaml)")
    sweep.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars: the sweep's, and each run's and conversion's (TQDM_DISABLE=1)")
    sweep.add_argument("--convert", action="store_true",
                       help="start every non-baseline norm from a model converted once from --model "
                       "(`hf-adanorm convert`: distilled from the original while the norms are blended in), "
                       "so that each arm starts from (nearly) the original function; see docs/conversion.md")
    sweep.add_argument("--convert-options", "--convert_options", dest="convert_options", default="{}",
                       metavar="JSON", help="options of those conversions as a JSON object of `hf-adanorm "
                       "convert` options, e.g. '{\"max_steps\": 600, \"dataset\": \"texts/\"}' (default: the "
                       "sweep's model, dataset, norm options and max_length, and convert's defaults)")
    sweep.add_argument("--overwrite_output_dir", "--overwrite-output-dir", dest="overwrite_output_dir",
                       action="store_true", help="start the sweep afresh: delete the runs/, report/ and "
                       "sweep.json already in --output-dir and, with --convert, convert again (without it "
                       "finished runs and conversions are kept and reused)")
    for single in ("--norm", "--seed"):  # hidden: only there to point to --norms / --seeds
        p.add_argument(single, dest=f"single_{single[2:]}", action="append", help=argparse.SUPPRESS)
    p.set_defaults(func=run_compare, shared_options=shared)
    return p


def fail(message) -> int:
    """A usage-style error without argparse's usage block (which lists every training option)."""
    print(f"hf-adanorm compare: error: {message}", file=sys.stderr)
    return 2


def run_compare(args) -> int:
    import datasets
    import torch

    from . import compare
    from .default import default_setup, write_digits_csv
    from ..sources import expand_home
    from ..training.args import PATH_OPTIONS, check_sources
    from .sweep import accelerate_runner, check_plan, check_sweep

    for single in ("norm", "seed"):
        if getattr(args, f"single_{single}"):
            return fail(f"--{single} sets a single run; compare takes --{single}s A B ...")
    # '~/m' expanded here, so that the sweep records, fingerprints and checks the folder the runs load
    given = {k: expand_home(getattr(args, k)) if k in PATH_OPTIONS else getattr(args, k)
             for k in sorted(args.shared_options) if hasattr(args, k)}
    args.output_dir = expand_home(args.output_dir)
    try:
        check_plan(args.norms, args.seeds)
        if args.accelerate_config and args.launcher != "accelerate":
            raise ValueError("--accelerate-config needs --launcher accelerate")
        if "model" in given and "dataset" not in given:
            raise ValueError("--model needs --dataset (or give neither for the built-in digits demo)")
        demo = "model" not in given and "dataset" not in given
        setup = dict(default_setup(args.output_dir), **given) if demo else given
        conversion = _conversion_options(args)
        if setup.get("model"):  # named before the sweep folder is made
            check_sources(setup["model"], setup.get("tokenizer"))
        # writes nothing; with the conversion options, which sweep.json records beside the setup
        check_sweep(setup, args.norms, args.seeds, args.output_dir, args.overwrite_output_dir, conversion)
        run_fn = accelerate_runner(args.accelerate_config) if args.launcher == "accelerate" else None
        if conversion is not None:
            from .conversions import plan_conversions
            plan_conversions(setup, args.norms, args.output_dir, conversion)  # checks every option
    except (ValueError, OSError) as err:  # OSError: a missing file, a sweep folder in use
        return fail(err)
    threads, data_bars = torch.get_num_threads(), datasets.is_progress_bar_enabled()
    if demo:
        write_digits_csv(setup["dataset"])
        # The demo's matrices are tiny: a second intra-op thread gains nothing, and on a busy
        # machine its spin-waiting made each step 10-25x slower in our measurements.
        torch.set_num_threads(1)
    datasets.disable_progress_bars()  # per-run data loading bars would bury the sweep's own
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    if not args.progress:  # the runs' and conversions' bars too, in this process and in launched ones
        os.environ["TQDM_DISABLE"] = "1"
    try:
        report = compare(setup, args.norms, args.seeds, args.output_dir, run_fn=run_fn,
                         progress=args.progress, overwrite=args.overwrite_output_dir, conversion=conversion)
    except (ValueError, OSError) as err:  # bad data, model or folder: the training code says which
        return fail(err)
    finally:
        torch.set_num_threads(threads)
        if data_bars:
            datasets.enable_progress_bars()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable
    print(f"report: {report}\n" + Path(report).read_text())
    return 0


def _conversion_options(args) -> dict | None:
    import json

    if not args.convert:
        if args.convert_options != "{}":
            raise ValueError("--convert-options needs --convert")
        return None
    try:
        options = json.loads(args.convert_options)
    except json.JSONDecodeError as err:
        raise ValueError(f"--convert-options must be a JSON object, got {args.convert_options!r}: {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--convert-options must be a JSON object, got {args.convert_options!r}")
    return options  # plan_conversions checks what it sets

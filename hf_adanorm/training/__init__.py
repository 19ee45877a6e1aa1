"""Accelerate training for hf_adanorm: the code behind ``recipes/`` and ``hf-adanorm compare``.

    >>> from hf_adanorm.training import TrainingArgs, run_training
    >>> metrics = run_training(TrainingArgs(task="classification", model="...", dataset="...",
    ...                                     norm="adanorm", output_dir="runs/adanorm-seed0"))

``run_training`` writes ``run_config.json``, ``checkpoints/step_N``, ``model/`` and, last
and atomically, ``metrics.json`` into ``output_dir``: that file exists only for a finished run.
"""

from .args import TrainingArgs, parse_args
from .checkpoints import METRICS_FILE, latest_checkpoint


def __getattr__(name):
    # The loop pulls in accelerate and datasets (seconds): load it on first use, so that
    # `hf-adanorm --help` and option parsing stay fast.
    if name in ("RUN_CONFIG_FILE", "train"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_module(task: str):
    """The module (``classification`` or ``causal_lm``) with ``build_task`` / ``training_function``."""
    from . import causal_lm, classification
    return {"classification": classification, "causal_lm": causal_lm}[task]


def run_recipe(task: str) -> int:
    """A recipe's command line (``recipes/*.py``): its options, then the run. Bad input (data, model, folder,
    an option that clashes with the launcher) is one line on stderr and exit status 2, as in ``hf-adanorm
    convert``, not the chained tracebacks of datasets and accelerate; a Ctrl-C says how to go on."""
    import sys
    from pathlib import Path

    args = parse_args(task=task)  # --help lists every option
    command = Path(sys.argv[0]).name
    try:
        run_training(args)
    except (ValueError, OSError) as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted. With --checkpointing_steps, rerun it with --resume_from_checkpoint latest "
              "to continue from the last checkpoint.", file=sys.stderr)
        return 130
    return 0


def run_training(args: TrainingArgs) -> dict:
    """Train as ``args`` says; returns (and writes to metrics.json) {"config", "history", "final", ...}."""
    return task_module(args.task).training_function(args)


__all__ = ["METRICS_FILE", "RUN_CONFIG_FILE", "TrainingArgs", "latest_checkpoint", "parse_args",
           "run_recipe", "run_training", "task_module", "train"]

"""``hf-adanorm compare``: train one model with several norms x several seeds, then report.

    >>> from hf_adanorm.compare import compare
    >>> compare(setup, norms=["layernorm", "adanorm"], seeds=[0, 1, 2], output_dir="out")

writes ``out/runs/<norm>_seed<seed>/`` (one training run each, skipped when already
finished) and ``out/report/`` (report.md, runs.csv, runs.json, summary.json, PNG plots).
"""

from __future__ import annotations

from pathlib import Path

from ..training.args import BASELINE
from .sweep import RunFn, accelerate_runner, known_norms, run_sweep

__all__ = ["compare", "run_sweep", "write_report", "accelerate_runner", "known_norms", "BASELINE"]


def write_report(runs: list[dict], norms, folder, setup: dict | None = None, baseline: str = BASELINE) -> Path:
    """See :func:`hf_adanorm.compare.report.write_report` (imported on first use: pandas,
    scipy and matplotlib would otherwise slow every ``hf-adanorm`` command down)."""
    from .report import write_report as write

    return write(runs, list(norms), folder, setup=setup, baseline=baseline)


def compare(setup: dict, norms, seeds, output_dir, run_fn: RunFn | None = None,
            progress: bool = True, overwrite: bool = False, conversion: dict | None = None) -> Path:
    """Run the sweep (see :func:`run_sweep`) and write its report; returns report.md's path.
    The sweep folder stays locked until the report is written.

    ``conversion`` (a dict of ``ConvertArgs`` options, ``{}`` for the defaults) makes every
    non-baseline norm fine-tune a model converted once from ``setup["model"]`` (see
    :mod:`hf_adanorm.compare.conversions`); None fine-tunes the naively swapped model.
    """
    from ..training.locks import folder_lock
    from .sweep import LOCK_USER, check_sweep

    folder = check_sweep(setup, list(norms), list(seeds), output_dir, overwrite, conversion)
    if conversion is not None:  # every option checked before the lock creates the folder
        from .conversions import (check_conversions_current, check_runs_fit, converted_model, plan_conversions,
                                  run_conversions)

        plans = plan_conversions(setup, norms, output_dir, conversion)
        if not overwrite:
            check_runs_fit(plans, folder)
            check_conversions_current(plans)
    with folder_lock(folder, LOCK_USER):
        models, results = None, {}
        if conversion is not None:
            # afresh means the conversions too (the model at --model may have changed): each is redone,
            # after convert has checked its inputs, so a refused rerun deletes nothing
            results = run_conversions(plans, progress=progress, overwrite=overwrite)
            models = {norm: converted_model(args) for norm, args in plans.items()}
        runs = run_sweep(setup, norms, seeds, output_dir, run_fn=run_fn, progress=progress, overwrite=overwrite,
                         models=models, conversion=conversion)
        report = write_report(runs, norms, Path(output_dir) / "report", setup=setup)
        if results:
            from .conversions import starting_drift_table

            title, _, rest = report.read_text().partition("\n")
            section = "\n".join(starting_drift_table(results, BASELINE in norms))
            report.write_text(f"{title}\n\n{section}{rest}")
        return report

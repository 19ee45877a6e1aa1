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
            progress: bool = True, overwrite: bool = False) -> Path:
    """Run the sweep (see :func:`run_sweep`) and write its report; returns report.md's path.
    The sweep folder stays locked until the report is written."""
    from ..training.locks import folder_lock
    from .sweep import LOCK_USER, check_sweep

    with folder_lock(check_sweep(setup, list(norms), list(seeds), output_dir, overwrite), LOCK_USER):
        runs = run_sweep(setup, norms, seeds, output_dir, run_fn=run_fn, progress=progress, overwrite=overwrite)
        return write_report(runs, norms, Path(output_dir) / "report", setup=setup)

"""The report folder of a sweep: report.md, runs.csv, runs.json, summary.json and PNG plots.

Every number in report.md comes from summary.json, which comes from the per-run
``metrics.json`` files alone (see :mod:`.stats`), so the report can always be rebuilt
from the run folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .plots import plot_final_metrics, plot_learning_curves
from .stats import BASELINE, CONFIDENCE, summarize


def _is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def fmt(x: float, digits: int = 4) -> str:
    """A number as the report prints it ("–" where undefined)."""
    return "–" if x is None or _is_nan(x) else f"{x:.{digits}g}"


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run: norm, seed, run folder and every final metric."""
    return pd.DataFrame([dict(norm=r["norm"], seed=r["seed"], run_dir=r["run_dir"], **r["final"])
                         for r in runs])


def metric_table(rows: list[dict], with_paired: bool, baseline: str) -> list[str]:
    """The markdown table of one metric, one line per norm."""
    head = ["norm", "n", "mean ± std", f"{CONFIDENCE:.0%} CI"]
    if with_paired:
        head += [f"Δ vs {baseline} [{CONFIDENCE:.0%} CI]", "pairs", "paired t p", "Wilcoxon p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["norm"], str(row["n"]), f"{fmt(row['mean'])} ± {fmt(row['std'])}",
                 f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"]
        if with_paired:
            if "mean_diff" in row:
                cells += [f"{fmt(row['mean_diff'])} [{fmt(row['diff_ci_low'])}, {fmt(row['diff_ci_high'])}]",
                          str(row["n_pairs"]), fmt(row["t_pvalue"], 3), fmt(row["wilcoxon_pvalue"], 3)]
            else:
                cells += ["(baseline)", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def caveats(runs: list[dict], summary: list[dict], norms: list[str], baseline: str) -> list[str]:
    """What the reader must keep in mind, computed from this sweep's own n."""
    counts = {n: sum(r["norm"] == n for r in runs) for n in norms}
    smallest = min(counts.values())
    notes = [f"- Runs (seeds) per norm: {', '.join(f'{n} {c}' for n, c in counts.items())}."]
    if smallest >= 2:
        notes.append(f"- The {CONFIDENCE:.0%} CI is mean ± t·std/√n; with n = {smallest} seeds "
                     f"t = {_t_quantile(smallest):.2f} (1.96 only as n grows large), so few seeds give wide CIs.")
    else:
        notes.append("- Some norm has one seed only: with one seed there is no spread, hence no CI "
                     "and no test. Use --seeds with several values.")
    pairs = [row["n_pairs"] for row in summary if "n_pairs" in row]
    if not any(r["norm"] == baseline for r in runs):
        notes.append(f"- No `{baseline}` runs in this sweep: the paired columns are omitted. "
                     f"Add `{baseline}` to --norms to compare against the unpatched model.")
    elif pairs:
        m = min(pairs)
        notes.append(f"- Δ = norm − {baseline}, paired by seed: for accuracy and F1 higher is better, "
                     "for losses (and perplexity, bits per character) lower is better.")
        notes.append(f"- With {m} pairs the smallest "
                     f"two-sided Wilcoxon p attainable is {2 / 2 ** m:.3g}; the t-test assumes normal "
                     "differences. No correction for testing several norms and metrics.")
    notes.append("- A difference is evidence only when its CI excludes 0 over enough seeds; "
                 "a small model on a small dataset says little about the paper's settings.")
    return notes


def _t_quantile(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1))


def write_report(runs: list[dict], norms: list[str], folder: str | Path, setup: dict | None = None,
                 baseline: str = BASELINE) -> Path:
    """Write the report folder for ``runs`` (dicts with norm, seed, run_dir, final, history).

    ``setup`` (the shared training options) is printed at the top.  Returns report.md's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, norms, baseline)
    with_paired = any(r["norm"] == baseline for r in runs)

    runs_table(runs).to_csv(folder / "runs.csv", index=False)
    (folder / "runs.json").write_text(json.dumps(
        [{k: r[k] for k in ("norm", "seed", "run_dir", "final")} for r in runs], indent=2))
    (folder / "summary.json").write_text(json.dumps(
        {"baseline": baseline if with_paired else None, "confidence": CONFIDENCE,
         "rows": [{k: None if _is_nan(v) else v for k, v in row.items()} for row in summary]},
        indent=2))  # undefined numbers as null: NaN is not JSON
    curves = plot_learning_curves(runs, norms, folder)
    finals = plot_final_metrics(runs, summary, norms, folder)

    md = ["# hf-adanorm comparison", ""]
    if setup:
        md += ["Shared training options: " + ", ".join(f"`{k}={v}`" for k, v in setup.items()
                                                       if v is not None), ""]
    md += ["**Read with care.**", *caveats(runs, summary, norms, baseline), ""]
    for metric in dict.fromkeys(row["metric"] for row in summary):
        md += [f"## {metric}", "", *metric_table([r for r in summary if r["metric"] == metric],
                                                with_paired, baseline), ""]
    md += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in finals + curves), "",
           "Every run's final metrics: `runs.csv`, `runs.json`; the numbers above at full "
           "precision: `summary.json`.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(md))
    return path

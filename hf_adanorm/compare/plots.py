"""PNG plots of a sweep: learning curves with seed bands, final metrics with 95% CIs, and the seed-paired
differences from the baseline that the report's tests are made on."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display and in worker processes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .stats import is_diagnostic  # noqa: E402

X_KEYS = ("step", "epoch")  # the x axis of a learning curve, in order of preference


def _file_name(prefix: str, metric: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)  # (None: a NaN stored as null)


def history_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per logged history point, with the run's norm and seed."""
    rows = [dict(point, norm=r["norm"], seed=r["seed"]) for r in runs for point in r.get("history", [])]
    return pd.DataFrame(rows)


def plot_learning_curves(runs: list[dict], norms: list[str], folder: Path) -> list[Path]:
    """One figure per history metric: per norm the mean over seeds, shaded mean +/- 1 std."""
    frame = history_frame(runs)
    x_key = next((k for k in X_KEYS if k in frame.columns), None)
    if frame.empty or x_key is None:
        return []
    metrics = [c for c in frame.columns if c not in (*X_KEYS, "norm", "seed") and not is_diagnostic(c)
               and pd.api.types.is_numeric_dtype(frame[c])]
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        for norm in norms:
            points = frame[frame.norm == norm].dropna(subset=[metric])
            # a seed that diverged logs NaN or inf from some point on; the mean of the seeds left would be
            # another mean than the table's, so the curve ends before the first such point
            bad = [(r["seed"], p.get(x_key)) for r in runs if r["norm"] == norm for p in r.get("history", [])
                   if metric in p and not _finite(p[metric])]
            ends = [x for _, x in bad if x is not None]
            if ends:
                points = points[points[x_key] < min(ends)]
            if points.empty:
                continue
            curve = points.groupby(x_key)[metric].agg(["mean", "std", "count"])
            diverged = len({seed for seed, _ in bad})
            label = f"{norm} (n={frame[frame.norm == norm].seed.nunique()}" + (
                f"; {diverged} diverged where the curve ends)" if diverged else ")")
            line, = ax.plot(curve.index, curve["mean"], label=label)
            spread = curve["std"].fillna(0.0)  # a single seed has no band
            ax.fill_between(curve.index, curve["mean"] - spread, curve["mean"] + spread,
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel=x_key, ylabel=metric, title=f"{metric}: mean over seeds, band = ±1 std")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, folder / _file_name("curve", metric)))
    return written


def plot_final_metrics(runs: list[dict], summary: list[dict], norms: list[str], folder: Path) -> list[Path]:
    """One figure per final metric: per norm the mean with its 95% CI whisker, every seed a dot.

    Point ranges rather than bars: a bar must start at zero to be honest, which hides
    differences of a fraction of a point; a point range needs no zero on the axis.
    """
    written = []
    for metric in dict.fromkeys(row["metric"] for row in summary):
        rows = {row["norm"]: row for row in summary if row["metric"] == metric}
        shown = [n for n in norms if rows.get(n, {}).get("n", 0) > 0]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(1.5 * len(shown) + 2, 4))
        for i, norm in enumerate(shown):
            row = rows[norm]
            seeds = [r["final"][metric] for r in runs if r["norm"] == norm and metric in r["final"]]
            ax.scatter([i + 0.15] * len(seeds), seeds, color="gray", s=14, zorder=3,
                       label="one seed" if i == 0 else None)
            if math.isnan(row["ci_low"]):  # n = 1 (or a bounded interval too wide to give): no whisker
                ax.plot(i, row["mean"], "o", color="C0", mfc="white", label="mean, no CI" if i == 0 else None)
                continue
            ax.errorbar(i, row["mean"], yerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                        fmt="o", color="C0", capsize=6, label="mean, 95% CI" if i == 0 else None)
        ax.set_xticks(range(len(shown)), shown)
        ax.set_xlim(-0.6, len(shown) - 0.4)
        ax.set(ylabel=metric, title=f"final {metric}")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, folder / _file_name("final", metric)))
    return written


def plot_paired_differences(runs: list[dict], summary: list[dict], norms: list[str], baseline: str,
                            folder: Path) -> list[Path]:
    """One figure per final metric: per norm its difference from ``baseline`` in every seed (a dot) and
    the mean difference with the paired 95% CI, beside a line at 0.

    This is what the report's tests are made on. The final_*.png intervals are each norm's own, and two of
    them can overlap where the paired interval of the difference excludes 0, because the seeds' common
    part (the same data order, the same initial weights) cancels in the pairs.
    """
    written = []
    for metric in dict.fromkeys(row["metric"] for row in summary):
        rows = {row["norm"]: row for row in summary if row["metric"] == metric and row.get("n_pairs", 0) > 0}
        shown = [n for n in norms if n != baseline and n in rows]
        if not shown:
            continue
        base = {r["seed"]: r["final"][metric] for r in runs if r["norm"] == baseline and metric in r["final"]}
        fig, ax = plt.subplots(figsize=(1.5 * len(shown) + 2.5, 4))
        ax.axhline(0.0, color="black", linewidth=0.8)
        labelled = set()

        def label(text):  # each legend entry once
            if text in labelled:
                return None
            labelled.add(text)
            return text

        for i, norm in enumerate(shown):
            row = rows[norm]
            diffs = [r["final"][metric] - base[r["seed"]] for r in runs
                     if r["norm"] == norm and metric in r["final"] and r["seed"] in base]
            ax.scatter([i + 0.15] * len(diffs), diffs, color="gray", s=14, zorder=3, label=label("one seed"))
            if math.isnan(row["diff_ci_low"]):  # one pair, no spread, a diverged run, or too wide to give
                ax.plot(i, row["mean_diff"], "o", color="C1", mfc="white", label=label("mean Δ, no CI"))
            else:
                ax.errorbar(i, row["mean_diff"], yerr=[[row["mean_diff"] - row["diff_ci_low"]],
                                                       [row["diff_ci_high"] - row["mean_diff"]]],
                            fmt="o", color="C1", capsize=6, label=label("mean Δ, paired 95% CI"))
            adjusted = row.get("t_pvalue_holm", math.nan)
            if math.isfinite(adjusted):
                ax.annotate(f"Holm p = {adjusted:.2g}", (i, row["mean_diff"]), xytext=(-12, 0),
                            textcoords="offset points", ha="right", va="center", fontsize="small")
        ax.set_xticks(range(len(shown)), shown)
        ax.set_xlim(-0.9, len(shown) - 0.4)
        ax.set(ylabel=f"Δ {metric} (norm − {baseline})", title=f"final {metric}: paired difference from {baseline}")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, folder / _file_name("paired", metric)))
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Per-norm statistics of a sweep's final metrics, and paired tests against the baseline.

For the n runs (seeds) of a norm with final values x_1..x_n of a metric:

    mean  = (1/n) sum_i x_i
    std   = sqrt( sum_i (x_i - mean)^2 / (n - 1) )                  (sample std, ddof = 1)
    CI95  = mean -/+ t_{0.975, n-1} * std / sqrt(n)                  (Student t, scipy.stats.t)

Against the baseline (``layernorm``, the unpatched model), runs are paired by seed, so
seed-to-seed variation that both share cancels: with d_i = x_i(norm) - x_i(baseline) over
the m seeds both have,

    mean_diff = (1/m) sum_i d_i,   its 95% CI from the t distribution with m - 1 dof,
    t_pvalue  = scipy.stats.ttest_rel (two-sided paired t-test; assumes normal d_i),
    wilcoxon_pvalue = scipy.stats.wilcoxon (signed-rank test, no normality assumption; with
                      m <= 5 pairs its two-sided p-value can never fall below 0.05).

Everything is NaN where it is undefined (n < 2, m < 2, or all d_i equal).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from ..training.args import BASELINE  # "layernorm": the unpatched model

CONFIDENCE = 0.95


def final_values(runs: list[dict], norm: str, metric: str) -> dict[int, float]:
    """{seed: final value of ``metric``} over the runs of ``norm`` that report it."""
    return {r["seed"]: float(r["final"][metric]) for r in runs
            if r["norm"] == norm and metric in r["final"]}


def describe(values) -> dict:
    """n, mean, sample std and the t-based confidence interval of the mean."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    out = dict(n=n, mean=float(x.mean()) if n else math.nan, std=math.nan,
               ci_low=math.nan, ci_high=math.nan)
    if n >= 2:
        out["std"] = float(x.std(ddof=1))
        low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=x.mean(), scale=stats.sem(x))
        out["ci_low"], out["ci_high"] = float(low), float(high)
    return out


def paired_vs_baseline(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """Paired comparison over the seeds present in both: norm minus baseline."""
    seeds = sorted(set(values) & set(baseline))
    x = np.array([values[s] for s in seeds])
    b = np.array([baseline[s] for s in seeds])
    out = dict(n_pairs=len(seeds), mean_diff=float((x - b).mean()) if seeds else math.nan,
               diff_ci_low=math.nan, diff_ci_high=math.nan, t_pvalue=math.nan,
               wilcoxon_pvalue=math.nan)
    diffs = x - b
    with warnings.catch_warnings():  # scipy warns about small samples; the report says so
        warnings.simplefilter("ignore")
        if len(seeds) >= 2 and np.ptp(diffs) > 0:  # the t statistic needs spread in d_i
            ttest = stats.ttest_rel(x, b)
            ci = ttest.confidence_interval(CONFIDENCE)
            out.update(t_pvalue=float(ttest.pvalue), diff_ci_low=float(ci.low),
                       diff_ci_high=float(ci.high))
        if len(seeds) >= 2 and np.any(diffs != 0):  # signed ranks need a non-zero d_i
            out["wilcoxon_pvalue"] = float(stats.wilcoxon(x, b).pvalue)
    return out


SPLIT_ORDER = ("test_", "eval_")  # held-out metrics first: they are what the comparison is for


def metric_names(runs: list[dict]) -> list[str]:
    """Every numeric final metric any run reports: test_*, then eval_*, then the rest."""
    names: dict[str, None] = {}
    for r in runs:
        for key, value in r["final"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                names.setdefault(key)
    rank = {prefix: i for i, prefix in enumerate(SPLIT_ORDER)}
    return sorted(names, key=lambda name: next((rank[p] for p in SPLIT_ORDER if name.startswith(p)),
                                               len(SPLIT_ORDER)))


def summarize(runs: list[dict], norms: list[str], baseline: str = BASELINE) -> list[dict]:
    """One row per (metric, norm): describe() and, when the baseline ran, paired_vs_baseline().

    ``runs`` are dicts with ``norm``, ``seed`` and ``final`` ({metric: value}).  The paired
    fields are left out of every row when no run of ``baseline`` exists.
    """
    has_baseline = any(r["norm"] == baseline for r in runs)
    rows = []
    for metric in metric_names(runs):
        base = final_values(runs, baseline, metric) if has_baseline else {}
        for norm in norms:
            values = final_values(runs, norm, metric)
            row = dict(metric=metric, norm=norm, **describe(values.values()))
            if has_baseline and norm != baseline:
                row.update(paired_vs_baseline(values, base))
            rows.append(row)
    return rows

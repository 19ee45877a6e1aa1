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

Everything is NaN where it is undefined (n < 2, m < 2, all d_i equal, or a value that is not finite:
a diverged run). d_i within 64 ulps of the values' magnitude count as equal (and as 0 near 0): the
accuracies 0.71 and 0.81 each 0.01 above their baseline give float differences that are not equal.

Bounded metrics (accuracy and F1 in [0, 1], losses >= 0, perplexity >= 1): where the t
interval leaves the bounds (few seeds, large spread), it is no interval of anything, so it
is left undefined and flagged ``ci_outside_bounds`` (the report says "n too small").

Across the report, with K paired t-tests (one per non-baseline norm and metric):

    t_pvalue_holm, wilcoxon_pvalue_holm = Holm's step-down adjustment over the K p-values
                      (controls the chance of any false "difference" at alpha, any dependence)
    mde = the smallest |true mean difference| the paired t-test at alpha = 0.05 detects with
          80% power over these m pairs, if the paired std is the observed one:
          the delta solving P(|T| > t_{0.975, m-1}) = 0.8, T ~ noncentral t(m - 1, delta sqrt(m) / s_d)
    seeds_needed = the smallest m with 80% power for the observed |mean_diff| (same s_d)
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from ..training.args import BASELINE  # "layernorm": the unpatched model

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the tests' significance level
POWER = 0.8  # of the minimum detectable effect
MAX_SEEDS = 1000  # seeds_needed beyond this is reported as "more than MAX_SEEDS"
# Diagnostics recorded beside the metrics (classification): not compared, but read by the report.
DIAGNOSTICS = ("majority_accuracy", "predicted_classes")
# Bounds of a metric, by the end of its name (after eval_ / test_).
BOUNDS = {"majority_accuracy": (0.0, 1.0), "accuracy": (0.0, 1.0), "f1": (0.0, 1.0),
          "loss": (0.0, math.inf), "perplexity": (1.0, math.inf), "bpc": (0.0, math.inf)}


def bounds_of(metric: str) -> tuple[float, float]:
    """The range a metric's values lie in ((-inf, inf) when unknown)."""
    return next((b for suffix, b in BOUNDS.items() if metric.endswith(suffix)), (-math.inf, math.inf))


def is_diagnostic(metric: str) -> bool:
    return metric.endswith(DIAGNOSTICS)


def _within(low: float, high: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= low and high <= bounds[1]


def final_values(runs: list[dict], norm: str, metric: str) -> dict[int, float]:
    """{seed: final value of ``metric``} over the runs of ``norm`` that report it."""
    return {r["seed"]: float(r["final"][metric]) for r in runs
            if r["norm"] == norm and metric in r["final"]}


def nonfinite_seeds(values: dict[int, float]) -> list[int]:
    """The seeds whose value is NaN or infinite: runs that diverged."""
    return sorted(seed for seed, value in values.items() if not math.isfinite(value))


def describe(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """n, mean, sample std and the t-based confidence interval of the mean (undefined, and
    flagged ``ci_outside_bounds``, where it would leave ``bounds``)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    out = dict(n=n, mean=float(x.mean()) if n else math.nan, std=math.nan,
               ci_low=math.nan, ci_high=math.nan, ci_outside_bounds=False)
    if n >= 2:
        out["std"] = float(x.std(ddof=1))
        with np.errstate(invalid="ignore"):  # std 0: scipy gives NaN (and numpy warns)
            low, high = stats.t.interval(CONFIDENCE, df=n - 1, loc=x.mean(), scale=stats.sem(x))
        if _within(low, high, bounds) or math.isnan(low):
            out["ci_low"], out["ci_high"] = float(low), float(high)
        else:
            out["ci_outside_bounds"] = True
    return out


def paired_vs_baseline(values: dict[int, float], baseline: dict[int, float],
                       bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """Paired comparison over the seeds present in both: norm minus baseline. ``bounds`` are
    the metric's: a difference lies within ±(high - low)."""
    seeds = sorted(set(values) & set(baseline))
    x = np.array([values[s] for s in seeds])
    b = np.array([baseline[s] for s in seeds])
    out = dict(n_pairs=len(seeds), mean_diff=float((x - b).mean()) if seeds else math.nan,
               diff_ci_low=math.nan, diff_ci_high=math.nan, t_pvalue=math.nan,
               wilcoxon_pvalue=math.nan, diff_std=math.nan, diff_ci_outside_bounds=False,
               mde=math.nan, seeds_needed=math.nan)
    diffs = x - b
    if not np.all(np.isfinite(diffs)):  # a diverged run: no statistic of it means anything
        return out
    # Round-off: 0.71 - 0.70 and 0.81 - 0.80 differ in their last bits, so "every seed gave the same
    # difference" (or none) must not read as a spread of 1e-17, which would make p tiny and the
    # detectable difference 2e-16. Differences within a few ulps of their own pair's values are the same
    # difference (per pair: one seed's large values must not swallow the others' real differences).
    tolerance = 64 * np.finfo(float).eps * np.maximum(1.0, np.maximum(np.abs(x), np.abs(b)))
    diffs = np.where(np.abs(diffs) <= tolerance, 0.0, diffs)
    out["mean_diff"] = float(diffs.mean()) if len(seeds) else math.nan  # (not 5.55e-17 for "the same Δ = 0")
    high, low = (int(np.argmax(diffs)), int(np.argmin(diffs))) if len(seeds) else (0, 0)
    spread = bool(len(seeds)) and diffs[high] - diffs[low] > tolerance[high] + tolerance[low]
    width = bounds[1] - bounds[0]
    with warnings.catch_warnings():  # scipy warns about small samples; the report says so
        warnings.simplefilter("ignore")
        if len(seeds) >= 2 and spread:  # the t statistic needs spread in d_i
            ttest = stats.ttest_1samp(diffs, 0.0)  # = ttest_rel(x, b), on the differences as judged above
            ci = ttest.confidence_interval(CONFIDENCE)
            out["t_pvalue"] = float(ttest.pvalue)
            if _within(ci.low, ci.high, (-width, width)):
                out.update(diff_ci_low=float(ci.low), diff_ci_high=float(ci.high))
            else:
                out["diff_ci_outside_bounds"] = True
        if len(seeds) >= 2:
            out["diff_std"] = float(diffs.std(ddof=1)) if spread else 0.0
            if spread:
                out["mde"] = min_detectable_effect(out["diff_std"], len(seeds))
                out["seeds_needed"] = seeds_needed(abs(out["mean_diff"]), out["diff_std"])
        if len(seeds) >= 2 and np.any(diffs != 0):  # signed ranks need a non-zero d_i
            out["wilcoxon_pvalue"] = float(stats.wilcoxon(diffs).pvalue)
    return out


def _power(noncentrality: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at ``alpha`` over n pairs (scipy's noncentral t)."""
    critical = stats.t.ppf(1 - alpha / 2, n - 1)
    # The wrong-sign tail is below P(Z < -noncentrality); scipy's nct.cdf returns NaN there
    # where it is tiny (scipy 1.17), and 0 is then exact to that bound.
    wrong_sign = stats.nct.cdf(-critical, n - 1, noncentrality)
    return float(stats.nct.sf(critical, n - 1, noncentrality) + (wrong_sign if math.isfinite(wrong_sign) else 0.0))


def min_detectable_effect(diff_std: float, n: int, alpha: float = ALPHA) -> float:
    """The |mean difference| the paired t-test at ``alpha`` detects with POWER over n pairs of this std."""
    from scipy.optimize import brentq

    noncentrality = brentq(lambda nc: _power(nc, n, alpha) - POWER, 0.0, 1e3, xtol=1e-10)
    return float(noncentrality * diff_std / math.sqrt(n))


def seeds_needed(effect: float, diff_std: float, alpha: float = ALPHA) -> float:
    """The fewest pairs giving POWER against ``effect`` at ``alpha`` (NaN for no effect, inf past MAX_SEEDS)."""
    if not effect > 0:
        return math.nan
    for n in range(2, MAX_SEEDS + 1):
        if _power(effect * math.sqrt(n) / diff_std, n, alpha) >= POWER:
            return n
    return math.inf


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order; NaN ones are not tests and stay NaN.

    Sorted ascending p_(1) <= ... <= p_(K): adjusted p_(i) = max over j <= i of min(1, (K - j + 1) p_(j)).
    """
    p = np.asarray(pvalues, dtype=float)
    tested = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), math.nan)
    order = tested[np.argsort(p[tested], kind="stable")]
    k = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (k - i) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


SPLIT_ORDER = ("test_", "eval_")  # held-out metrics first: they are what the comparison is for


def metric_names(runs: list[dict]) -> list[str]:
    """Every numeric final metric any run reports: test_*, then eval_*, then the rest."""
    names: dict[str, None] = {}
    for r in runs:
        for key, value in r["final"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not is_diagnostic(key):
                names.setdefault(key)
    rank = {prefix: i for i, prefix in enumerate(SPLIT_ORDER)}
    return sorted(names, key=lambda name: next((rank[p] for p in SPLIT_ORDER if name.startswith(p)),
                                               len(SPLIT_ORDER)))


def summarize(runs: list[dict], norms: list[str], baseline: str = BASELINE) -> list[dict]:
    """One row per (metric, norm): describe() and, when the baseline ran, paired_vs_baseline()
    with Holm-adjusted p-values over every (norm, metric) compared.

    ``runs`` are dicts with ``norm``, ``seed`` and ``final`` ({metric: value}).  The paired
    fields are left out of every row when no run of ``baseline`` exists.
    """
    has_baseline = any(r["norm"] == baseline for r in runs)
    rows = []
    for metric in metric_names(runs):
        base = final_values(runs, baseline, metric) if has_baseline else {}
        for norm in norms:
            values = final_values(runs, norm, metric)
            row = dict(metric=metric, norm=norm, **describe(values.values(), bounds_of(metric)),
                       nonfinite_seeds=nonfinite_seeds(values))
            if has_baseline and norm != baseline:
                row.update(paired_vs_baseline(values, base, bounds_of(metric)),
                           baseline_nonfinite_seeds=nonfinite_seeds(base))
            rows.append(row)
    paired = [row for row in rows if "n_pairs" in row]
    for test in ("t_pvalue", "wilcoxon_pvalue"):
        for row, adjusted in zip(paired, holm([row[test] for row in paired])):
            row[f"{test}_holm"] = adjusted
    return rows

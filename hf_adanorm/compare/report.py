"""The report folder of a sweep: report.md, runs.csv, runs.json, summary.json and PNG plots.

Every number in report.md comes from summary.json, which comes from the per-run
``metrics.json`` files alone (see :mod:`.stats`), so the report can always be rebuilt
from the run folders.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from .plots import plot_final_metrics, plot_learning_curves, plot_paired_differences
from .stats import (ALPHA, BASELINE, CONFIDENCE, MAX_SEEDS, POWER, SPLIT_ORDER, bounds_of, is_diagnostic,
                    min_detectable_effect, seeds_needed, summarize)


PLOT_NAME = re.compile(r"(curve|final|paired)_.+\.png")  # the plots a report writes


def _is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _json_number(x):
    """NaN (undefined) and infinity (seeds_needed past the limit) are not JSON: null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def fmt(x: float, digits: int = 4) -> str:
    """A number as the report prints it ("–" where undefined)."""
    return "–" if x is None or _is_nan(x) else f"{x:.{digits}g}"


def split_of(metric: str) -> str:
    """'test_', 'eval_' or '' (e.g. train_loss): the split a metric was measured on."""
    return next((prefix for prefix in SPLIT_ORDER if metric.startswith(prefix)), "")


def single_class_seeds(runs: list[dict], norm: str, split: str) -> list[int]:
    """Seeds of ``norm`` whose model predicted one class only on ``split`` (classification)."""
    return sorted(r["seed"] for r in runs if r["norm"] == norm and r["final"].get(f"{split}predicted_classes") == 1)


def majority_baseline_text(runs: list[dict], split: str) -> str | None:
    """Accuracy on ``split`` of always predicting train's most frequent class, as the report prints it
    (None if not recorded). Every run of a sweep sees the same split, so there is one value; several
    mean the runs saw different data, which is said rather than averaged away."""
    values = sorted({r["final"][f"{split}majority_accuracy"] for r in runs if f"{split}majority_accuracy" in r["final"]})
    if len(values) > 1:
        return f"⚠ {' / '.join(fmt(v) for v in values)}: the runs did not all see the same {split.rstrip('_')} data"
    return fmt(values[0]) if values else None


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run: norm, seed, run folder, the splits it predicted one class only on, every final metric."""
    return pd.DataFrame([dict(norm=r["norm"], seed=r["seed"], run_dir=r["run_dir"],
                              single_class=" ".join(split.rstrip("_") for split in SPLIT_ORDER
                                                    if r["final"].get(f"{split}predicted_classes") == 1),
                              **r["final"]) for r in runs])


def _interval(low, high, outside: bool) -> str:
    return "n too small †" if outside else f"[{fmt(low)}, {fmt(high)}]"


def metric_table(rows: list[dict], with_paired: bool, baseline: str, runs: list[dict] | None = None) -> list[str]:
    """The markdown table of one metric, one line per norm."""
    runs = runs or []
    split = split_of(rows[0]["metric"]) if rows else ""
    flags = any(f"{split}predicted_classes" in r["final"] for r in runs) if split else False
    head = ["norm", "n", "mean ± std", f"{CONFIDENCE:.0%} CI"]
    if with_paired:
        head += [f"Δ vs {baseline} [{CONFIDENCE:.0%} CI]", "pairs", "paired t p", "Holm", "Wilcoxon p", "Holm",
                 f"detectable \\|Δ\\| ({POWER:.0%} power)"]
    if flags:
        head += ["single-class seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["norm"], str(row["n"]), f"{fmt(row['mean'])} ± {fmt(row['std'])}",
                 _interval(row["ci_low"], row["ci_high"], row.get("ci_outside_bounds", False))]
        if with_paired:
            if "mean_diff" in row:
                cells += [f"{fmt(row['mean_diff'])} "
                          + _interval(row["diff_ci_low"], row["diff_ci_high"], row.get("diff_ci_outside_bounds", False)),
                          str(row["n_pairs"]), fmt(row["t_pvalue"], 3), fmt(row["t_pvalue_holm"], 3),
                          fmt(row["wilcoxon_pvalue"], 3), fmt(row["wilcoxon_pvalue_holm"], 3), fmt(row["mde"], 3)]
            else:
                cells += ["(baseline)", "", "", "", "", "", ""]
        if flags:
            seeds = single_class_seeds(runs, row["norm"], split)
            cells.append(("⚠ " + ", ".join(map(str, seeds))) if seeds else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


HEADLINE_SUFFIXES = ("accuracy", "bpc", "perplexity", "loss", "f1")  # what the verdict's MDE is given for


def headline_metric(summary: list[dict]) -> str | None:
    """The metric the verdict speaks of: held-out (test, else validation) accuracy, bpc, perplexity or loss."""
    names = list(dict.fromkeys(row["metric"] for row in summary))
    for prefix in SPLIT_ORDER:
        for suffix in HEADLINE_SUFFIXES:
            if f"{prefix}{suffix}" in names:
                return f"{prefix}{suffix}"
    return names[0] if names else None


def _seed_list(runs: list[dict], norms: list[str], split: str) -> str:
    parts = []
    for norm in norms:
        seeds = single_class_seeds(runs, norm, split)
        if seeds:
            parts.append(f"{norm} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def verdict(runs: list[dict], summary: list[dict], norms: list[str], baseline: str) -> list[str]:
    """The report's opening lines: what the numbers allow one to say, and what they hide."""
    lines = []
    for split in SPLIT_ORDER:
        flagged = sum(r["final"].get(f"{split}predicted_classes") == 1 for r in runs)
        if flagged:
            majority = majority_baseline_text(runs, split)
            lines.append(f"- **⚠ {flagged} of {len(runs)} runs predicted a single class on the "
                         f"{split.rstrip('_')} split** ({_seed_list(runs, norms, split)}): their accuracy is at best "
                         f"the majority-class baseline ({majority or '–'}), so they show nothing about the norms.")
    diverged = _diverged(runs)
    if diverged:
        lines.append(f"- **⚠ {len(diverged)} of {len(runs)} runs ended with a metric that is not a number** ("
                     + "; ".join(f"{norm} seed {seed}: {', '.join(metrics)}" for (norm, seed), metrics in diverged.items())
                     + "): they diverged, so the mean, CI and tests of those metrics are undefined (–) for "
                     "their norm.")
    if not any(r["norm"] == baseline for r in runs):
        return lines + [f"- No `{baseline}` runs: the norms are described below, not tested against the baseline."]
    if all(r["norm"] == baseline for r in runs):
        return lines + [f"- Only `{baseline}` ran: there is nothing to compare it with. Add norms to --norms."]
    headline = headline_metric(summary)
    paired = [row for row in summary if "n_pairs" in row]
    tests = sum(not math.isnan(row["t_pvalue"]) for row in paired)
    for norm in dict.fromkeys(row["norm"] for row in paired):
        mine = [row for row in paired if row["norm"] == norm]
        found = [row for row in mine if row["t_pvalue_holm"] < ALPHA]
        if found:
            text = f"- **{norm}** differs from {baseline} on " + ", ".join(
                f"{row['metric']} (Δ = {row['mean_diff']:+.3g}, Holm-adjusted p = {fmt(row['t_pvalue_holm'], 2)})"
                for row in found)
        elif tests:
            text = (f"- **{norm}**: no difference from {baseline} detected (Holm-adjusted paired t p ≥ {ALPHA:g} "
                    f"over the {tests} test{'s' if tests > 1 else ''} of this report)")
            # a nominal difference that Holm's adjustment takes back: said, not left for the table to contradict
            nominal = [row for row in mine if row["t_pvalue"] < ALPHA]
            if nominal:
                text += ("; nominally " + ", ".join(
                    f"{row['metric']} Δ = {row['mean_diff']:+.3g} (unadjusted p = {fmt(row['t_pvalue'], 2)}, its "
                    f"{CONFIDENCE:.0%} CI excludes 0)" for row in nominal)
                    + ", not significant once adjusted for the tests made")
        else:
            text = f"- **{norm}**: no test against {baseline} was possible"
        head = next((row for row in mine if row["metric"] == headline), None)
        if head is not None:
            text += "; " + _detectable(head, found_here=head in found, tests=tests)
        lines.append(text + ".")
    return lines


def _diverged(runs: list[dict]) -> dict[tuple[str, int], list[str]]:
    """{(norm, seed): the final metrics that are NaN or infinite} of each run that has one."""
    found = {}
    for r in runs:
        bad = [k for k, v in r["final"].items()
               if isinstance(v, float) and not math.isfinite(v) and not is_diagnostic(k)]
        if bad:
            found[(r["norm"], r["seed"])] = bad
    return found


def _detectable(row: dict, found_here: bool, tests: int = 1) -> str:
    """What this number of seeds could detect in ``row``'s metric: by one t-test at ALPHA (the table's
    column) and, over several tests, at ALPHA / tests, the strictest step of the Holm adjustment the
    verdict applies (so the most seeds the verdict could need)."""
    m, metric = row["n_pairs"], row["metric"]
    lost = [f"{row['norm']} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            for seeds in [row.get("nonfinite_seeds", [])] if seeds]
    lost += [f"the baseline's seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
             for seeds in [row.get("baseline_nonfinite_seeds", [])] if seeds]
    if lost:
        return f"{' and '.join(lost)} diverged ({metric} is not a number): nothing about {metric} can be tested"
    if m < 2:
        return f"with {m} seed pair{'s' if m != 1 else ''} nothing can be tested"
    if math.isnan(row["mde"]):
        return (f"every seed gave the same Δ {metric} = {row['mean_diff']:+.3g}: with no spread the paired tests and "
                "the detectable difference are undefined")
    low, high = bounds_of(metric)
    if row["mde"] > high - low:  # e.g. an accuracy difference above 1
        return (f"with {m} seeds no difference in {metric} was detectable: it would take |Δ| > {fmt(row['mde'], 2)}, "
                f"beyond the metric's range ({POWER:.0%} power)")
    strict = ALPHA / tests
    text = (f"with {m} seeds only |Δ| > {fmt(row['mde'], 2)} in {metric} was detectable ({POWER:.0%} power, one "
            f"t-test at α = {ALPHA:g}")
    if tests > 1:
        adjusted = min_detectable_effect(row["diff_std"], m, strict)
        text += (f"; at α/{tests} = {strict:.2g}, the strictest Holm step over this report's {tests} tests: |Δ| > "
                 + (f"{fmt(adjusted, 2)}" if adjusted <= high - low else "more than the metric's range"))
    text += ")"
    needed = row["seeds_needed"]
    if not found_here and needed is not None and not math.isnan(needed) and needed > m:
        text += f"; the observed |Δ| = {abs(row['mean_diff']):.2g} would need {_seeds(needed)}"
        if tests > 1:
            text += f" ({_seeds(seeds_needed(abs(row['mean_diff']), row['diff_std'], strict))} at α/{tests})"
    return text


def _seeds(needed: float) -> str:
    return f"about {int(needed)} seeds" if math.isfinite(needed) else f"more than {MAX_SEEDS} seeds"


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
    if any(row.get("ci_outside_bounds") or row.get("diff_ci_outside_bounds") for row in summary):
        notes.append("- † n too small: the t interval would leave the metric's range (accuracy and F1 lie in "
                     "[0, 1], losses above 0), so it is no interval at all; more seeds (or less spread) give one.")
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
                     "differences. Holm: p-values adjusted over every norm × metric tested in this report "
                     "(the chance of any false difference stays below the level). The CIs and the detectable |Δ| are per "
                     "test, unadjusted: a CI can exclude 0 where the adjusted test finds no difference.")
        notes.append(f"- Detectable |Δ|: the smallest true difference the paired t-test (α = {ALPHA:g}) finds "
                     f"with {POWER:.0%} power at this number of seeds, if the paired std is the one observed.")
    notes.append("- A difference is evidence only when its CI excludes 0 over enough seeds; "
                 "a small model on a small dataset says little about the paper's settings.")
    return notes


def _t_quantile(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1))


def launch_text(runs: list[dict]) -> str | None:
    """How the runs were launched (they are checked alike): processes, distributed type, mixed precision
    and the global batch, which decides the optimizer's steps as much as any option does."""
    launch = next((r["launch"] for r in runs if r.get("launch")), None)
    if not launch:
        return None
    processes = launch.get("world_size")
    parts = [f"{processes} process{'es' if processes != 1 else ''}" if processes else None,
             f"distributed type `{str(launch['distributed_type']).removeprefix('DistributedType.')}`"
             if launch.get("distributed_type") else None,
             f"mixed precision `{launch['mixed_precision']}`" if launch.get("mixed_precision") else None,
             f"a global batch of {launch['global_batch_size']} examples per optimizer step "
             "(per-device batch × processes × accumulation)" if launch.get("global_batch_size") else None]
    return "Every run was launched with " + ", ".join(p for p in parts if p) + "."


def write_report(runs: list[dict], norms: list[str], folder: str | Path, setup: dict | None = None,
                 baseline: str = BASELINE) -> Path:
    """Write the report folder for ``runs`` (dicts with norm, seed, run_dir, final, history).

    ``setup`` (the shared training options) is printed at the top.  Returns report.md's path.
    """
    folder = Path(folder)
    runs = [r for r in runs if r["norm"] in norms]  # a baseline left out of norms is not paired against
    twice = sorted(key for key, count in Counter((r["norm"], r["seed"]) for r in runs).items() if count > 1)
    if twice:
        raise ValueError(f"runs are paired by seed, and these (norm, seed) come more than once: {twice}")
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, norms, baseline)
    with_paired = any(r["norm"] == baseline for r in runs)

    runs_table(runs).to_csv(folder / "runs.csv", index=False)
    (folder / "runs.json").write_text(json.dumps(  # NaN and inf are not JSON: null, as in summary.json
        [{**{k: r[k] for k in ("norm", "seed", "run_dir")}, "final": {k: _json_number(v) for k, v in r["final"].items()}}
         for r in runs], indent=2))
    (folder / "summary.json").write_text(json.dumps(
        {"baseline": baseline if with_paired else None, "confidence": CONFIDENCE,
         "rows": [{k: _json_number(v) for k, v in row.items()} for row in summary]},
        indent=2))
    curves = plot_learning_curves(runs, norms, folder)
    finals = plot_final_metrics(runs, summary, norms, folder)
    paired = plot_paired_differences(runs, summary, norms, baseline, folder) if with_paired else []
    for stale in set(folder.glob("*.png")) - {*curves, *finals, *paired}:  # an earlier report's, of other norms
        if PLOT_NAME.fullmatch(stale.name):
            stale.unlink()

    md = ["# hf-adanorm comparison", "", "**Verdict.**", *verdict(runs, summary, norms, baseline), ""]
    if setup:
        md += ["Shared training options: " + ", ".join(f"`{k}={v}`" for k, v in setup.items()
                                                       if v is not None), ""]
    launched = launch_text(runs)
    if launched:
        md += [launched, ""]
    md += ["**Read with care.**", *caveats(runs, summary, norms, baseline), ""]
    for metric in dict.fromkeys(row["metric"] for row in summary):
        md += [f"## {metric}", ""]
        majority = majority_baseline_text(runs, split_of(metric)) if metric.endswith("accuracy") else None
        if majority is not None:
            md += [f"Majority-class baseline (always predicting train's most frequent class): {majority}.", ""]
        md += [*metric_table([r for r in summary if r["metric"] == metric], with_paired, baseline, runs), ""]
    md += ["## Plots", ""]
    if paired:
        md += [f"`paired_*`: each norm's difference from {baseline}, seed by seed, with the paired 95% CI that the "
               "tests above use. `final_*`: each norm's own mean and CI; two of these can overlap where the paired "
               "interval excludes 0, because what the seeds share cancels in the pairs.", ""]
    md += [*(f"![{p.stem}]({p.name})" for p in paired + finals + curves), "",
           "Every run's final metrics: `runs.csv`, `runs.json`; the numbers above at full "
           "precision: `summary.json`.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(md))
    return path

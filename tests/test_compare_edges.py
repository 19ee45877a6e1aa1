"""The comparison report around its numbers: runs that are not one sweep, a diverged seed in the plots, the
verdict's detectable difference under its own Holm adjustment, and files left by an earlier report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from test_compare import SETUP, FakeRun
from test_compare_report import FixedRun

from hf_adanorm.compare import compare, run_sweep
from hf_adanorm.compare.report import write_report
from hf_adanorm.compare.sweep import SWEEP_FILE


def test_runs_made_with_other_options_are_refused_without_sweep_json(tmp_path):
    """sweep.json lost (or run folders copied in): another learning rate was paired into one report, under
    the header of the new one. The runs' own recorded options are compared too."""
    run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    (tmp_path / SWEEP_FILE).unlink()
    with pytest.raises(ValueError, match=r"other options \(learning_rate: 0\.001 in layernorm seed 0, 0\.01 in "
                                         r"layernorm seed 2\).*--overwrite_output_dir"):
        run_sweep(dict(SETUP, learning_rate=1e-2), ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=FakeRun(),
                  progress=False)


def test_one_arm_whose_runs_start_from_two_models_is_refused(tmp_path):
    """Each arm may start from its own (converted) model, but all of an arm's seeds from the same one."""
    run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=FakeRun(), progress=False,
              models={"adanorm": "converted-a"})
    (tmp_path / SWEEP_FILE).unlink()
    with pytest.raises(ValueError, match=r"model: 'converted-a' in adanorm seed 0, 'converted-b' in adanorm seed 1"):
        run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False,
                  models={"adanorm": "converted-b"})


@pytest.mark.parametrize("same", [{"weight_decay": 0.0}, {"checkpointing_steps": 1000}])
def test_a_rerun_with_the_same_training_is_not_refused(tmp_path, same):
    """An option given at its default, or one that changes no result, was refused as 'other training options'."""
    run_sweep(SETUP, ["layernorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)
    assert len(run_sweep(dict(SETUP, **same), ["layernorm"], [0, 1], tmp_path, run_fn=FakeRun(),
                         progress=False)) == 2
    with pytest.raises(ValueError, match="weight_decay: 0.0 then, 0.1 now"):  # a value that is not the default
        run_sweep(dict(SETUP, weight_decay=0.1), ["layernorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)


def test_a_diverged_seed_ends_its_learning_curve(tmp_path, monkeypatch):
    """Its NaN points were dropped, so the curve went on as the mean of the other seeds (n=3 in the legend)
    where the table has no mean."""
    import hf_adanorm.compare.plots as plots
    drawn = {}
    original = plots._save

    def keep(fig, path):
        drawn[path.name] = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].lines}
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    runs = [dict(norm=norm, seed=seed, run_dir="", final={"eval_loss": 1.0},
                 history=[dict(epoch=e, eval_loss=math.nan if (norm, seed, e >= 3) == ("adanorm", 1, True) else 1 / e)
                          for e in range(1, 6)])
            for norm in ("layernorm", "adanorm") for seed in range(3)]
    plots.plot_learning_curves(runs, ["layernorm", "adanorm"], tmp_path)
    assert drawn["curve_eval_loss.png"] == {"layernorm (n=3)": [1, 2, 3, 4, 5],
                                            "adanorm (n=3; 1 diverged where the curve ends)": [1, 2]}


def test_a_diverged_lm_run_has_an_infinite_perplexity_not_a_crash():
    from hf_adanorm.training.causal_lm import compute_metrics
    assert compute_metrics({"loss": np.array([800.0])}, char_level=False)["perplexity"] == math.inf
    assert math.isnan(compute_metrics({"loss": np.array([math.nan])}, char_level=False)["perplexity"])
    assert compute_metrics({"loss": np.array([2.0])}, char_level=False)["perplexity"] == pytest.approx(math.exp(2))


def spread(norm, seed):
    return dict(test_accuracy=0.8 + 0.01 * seed + ([0.02, -0.01, 0.03, 0.0][seed] if norm == "adanorm" else 0)
                + (0.01 * (seed == 1) if norm == "layernorm_simple" else 0))


def test_the_verdicts_detectable_difference_is_given_at_its_own_holm_level(tmp_path):
    """The verdict decides with Holm over every test of the report, but its detectable |Δ| and seeds needed were
    at an unadjusted α = 0.05 only; they are now also at α / tests, checked against scipy's noncentral t."""
    from scipy.optimize import brentq
    report = compare(SETUP, ["layernorm", "layernorm_simple", "adanorm"], [0, 1, 2, 3], tmp_path,
                     run_fn=FixedRun(spread), progress=False)
    row = next(r for r in json.loads((report.parent / "summary.json").read_text())["rows"] if r["norm"] == "adanorm")
    assert row["t_pvalue_holm"] >= 0.05, "the fixture should detect nothing once adjusted"
    line = next(x for x in report.read_text().splitlines() if x.startswith("- **adanorm**"))
    alpha = 0.05 / 2  # two tests: adanorm's and layernorm_simple's test_accuracy

    def power(nc, m):
        critical = stats.t.ppf(1 - alpha / 2, m - 1)
        wrong_sign = stats.nct.cdf(-critical, m - 1, nc)  # NaN where it underflows (scipy): 0
        return stats.nct.sf(critical, m - 1, nc) + (wrong_sign if math.isfinite(wrong_sign) else 0.0)

    adjusted = brentq(lambda nc: power(nc, 4) - 0.8, 0, 100) * row["diff_std"] / 2
    said = float(line.split("the strictest Holm step over this report's 2 tests: |Δ| > ")[1].split(")")[0])
    assert said == pytest.approx(adjusted, rel=0.01) and said > row["mde"]
    needed = next(m for m in range(2, 1000) if power(abs(row["mean_diff"]) * math.sqrt(m) / row["diff_std"], m) >= 0.8)
    assert needed > row["seeds_needed"] and f"(about {needed} seeds at α/2)" in line


def test_a_report_over_fewer_norms_leaves_no_plot_of_the_others(tmp_path):
    compare(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    assert (tmp_path / "report" / "paired_eval_accuracy.png").is_file()
    compare(SETUP, ["adanorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    left = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert left and not any(name.startswith("paired_") for name in left)
    assert all(f"]({name})" in (tmp_path / "report" / "report.md").read_text() for name in left)


def test_write_report_pairs_only_within_its_norms_and_refuses_a_seed_twice(tmp_path):
    runs = [dict(norm=norm, seed=seed, run_dir="", history=[],
                 final={"test_accuracy": 0.8 + 0.01 * seed + (norm == "adanorm") * 0.01, "test_loss": math.nan})
            for norm in ("layernorm", "adanorm") for seed in range(3)]
    report = write_report(runs, ["adanorm"], tmp_path / "only")
    assert "Δ vs" not in report.read_text() and "No `layernorm` runs in this sweep" in report.read_text()
    saved = json.loads((tmp_path / "only" / "runs.json").read_text())  # valid JSON: NaN is null
    assert [r["final"]["test_loss"] for r in saved] == [None] * 3
    with pytest.raises(ValueError, match=r"come more than once: \[\('layernorm', 1\)\]"):
        write_report([*runs, runs[1]], ["layernorm", "adanorm"], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("content, why", [("{\"final\": {", "not JSON"), ("{\"history\": []}", "no final metrics")])
def test_an_unreadable_run_is_named(tmp_path, content, why):
    run_sweep(SETUP, ["layernorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    metrics = tmp_path / "runs" / "layernorm_seed1" / "metrics.json"
    metrics.write_text(content)
    with pytest.raises(ValueError, match=f"layernorm_seed1/metrics.json is not a finished run's metrics \\({why}.*"
                                         "delete the folder"):
        run_sweep(SETUP, ["layernorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)


def test_no_difference_up_to_round_off_is_reported_as_zero():
    """The tests took 0.1 + 0.2 - 0.3 for 0, but the Δ printed beside them was 5.55e-17."""
    from hf_adanorm.compare.stats import paired_vs_baseline
    row = paired_vs_baseline({0: 0.1 + 0.2, 1: 0.3, 2: 0.3}, {0: 0.3, 1: 0.3, 2: 0.3})
    assert 0.1 + 0.2 - 0.3 != 0 and row["mean_diff"] == 0.0

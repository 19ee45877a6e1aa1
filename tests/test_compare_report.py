"""The comparison says what a reader would miss (verdict, single-class runs, Holm, detectable
difference, bounded intervals) and refuses what would mix or clobber sweeps."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import numpy as np
import pytest
from scipy import stats
from test_compare import SETUP, FakeRun
from test_recipe_guards import hold_lock

from hf_adanorm.cli import main
from hf_adanorm.compare import compare, run_sweep
from hf_adanorm.compare.stats import describe, holm, min_detectable_effect, seeds_needed
from hf_adanorm.compare.sweep import METRICS_FILE, RESULTS_VERSION
from hf_adanorm.training.locks import FolderInUseError


class FixedRun:
    """A run whose final metrics are given per (norm, seed)."""

    def __init__(self, finals):
        self.finals = finals

    def __call__(self, options):
        os.makedirs(options["output_dir"], exist_ok=True)
        final = self.finals(options["norm"], options["seed"])
        with open(f"{options['output_dir']}/{METRICS_FILE}", "w") as f:
            json.dump(dict(config=options, history=[dict(epoch=1, step=1, **final)], final=final,
                           results_version=RESULTS_VERSION), f)


def test_holm_on_a_hand_worked_example_and_as_a_step_down_test():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005, math.nan])[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm([0.01, math.nan])[1])
    rng = np.random.default_rng(0)
    for _ in range(200):  # adjusted p <= alpha rejects exactly what Holm's sequential procedure rejects
        p = rng.uniform(0, 0.1, size=rng.integers(1, 8))
        rejected, k = set(), len(p)
        for i, index in enumerate(np.argsort(p)):
            if p[index] > 0.05 / (k - i):
                break
            rejected.add(int(index))
        assert {i for i, q in enumerate(holm(p)) if q <= 0.05} == rejected


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_detectable_difference_has_80_percent_power_in_simulation(n):
    effect = min_detectable_effect(diff_std=2.0, n=n)
    rng = np.random.default_rng(n)
    d = rng.normal(effect, 2.0, size=(40000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(2 * stats.t.sf(np.abs(t), n - 1) < 0.05)
    assert power == pytest.approx(0.8, abs=0.01)
    assert seeds_needed(effect * 1.001, 2.0) == n and seeds_needed(effect * 0.99, 2.0) > n


def test_an_interval_that_would_leave_the_bounds_is_not_given():
    row = describe([0.0, 0.9], bounds=(0.0, 1.0))  # one seed predicted only the minority class
    assert row["ci_outside_bounds"] and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert not math.isnan(describe([0.0, 0.9])["ci_low"])  # the unbounded metric keeps its interval
    inside = describe([0.80, 0.82, 0.81], bounds=(0.0, 1.0))
    assert 0 < inside["ci_low"] < 0.81 < inside["ci_high"] < 1 and not inside["ci_outside_bounds"]


def majority_only(norm, seed):
    """Every run predicts the majority class of a 7 %-positive test set (the MiniLM case)."""
    return dict(test_loss=0.3 + 0.01 * seed, test_accuracy=0.906, test_f1=0.475, test_majority_accuracy=0.906,
                test_predicted_classes=1, eval_accuracy=0.9, eval_majority_accuracy=0.9,
                eval_predicted_classes=1 if seed else 2)


def test_single_class_runs_are_flagged_at_the_top_and_in_the_table(tmp_path):
    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=FixedRun(majority_only),
                     progress=False)
    text = report.read_text()
    top = text.split("## ")[0]
    assert ("**⚠ 6 of 6 runs predicted a single class on the test split** (layernorm seeds 0, 1, 2; adanorm seeds "
            "0, 1, 2): their accuracy is at best the majority-class baseline (0.906)") in top
    assert "4 of 6 runs predicted a single class on the eval split** (layernorm seeds 1, 2; adanorm seeds 1, 2)" in top
    assert ("**adanorm**: no test against layernorm was possible; every seed gave the same Δ test_accuracy = +0: "
            "with no spread") in top
    section = text.split("## test_accuracy\n")[1].split("\n## ")[0]
    assert "Majority-class baseline (always predicting train's most frequent class): 0.906." in section
    assert "| single-class seeds |" in section and "| adanorm | 3 |" in section
    assert section.count("⚠ 0, 1, 2") == 2
    eval_section = text.split("## eval_accuracy\n")[1].split("\n## ")[0]
    assert eval_section.count("⚠ 1, 2 |") == 2
    assert "## test_majority_accuracy" not in text and "## test_predicted_classes" not in text
    runs_csv = (report.parent / "runs.csv").read_text().splitlines()
    single_class = [line.split(",")[3] for line in runs_csv]  # runs in plan order: seed 0 of each norm first
    assert single_class == ["single_class", "test", "test", "test eval", "test eval", "test eval", "test eval"]
    assert not list(report.parent.glob("*predicted_classes*.png"))


def two_seeds_one_minority(norm, seed):
    """The tiny-model case: one seed predicts only the minority class."""
    accuracy = {("layernorm", 0): 0.906, ("layernorm", 1): 0.094, ("adanorm", 0): 0.9, ("adanorm", 1): 0.91}
    return dict(test_accuracy=accuracy[(norm, seed)], test_loss=0.3 + 0.1 * seed)


def test_a_bounded_metric_with_too_few_seeds_says_so(tmp_path):
    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=FixedRun(two_seeds_one_minority),
                     progress=False)
    rows = {(r["metric"], r["norm"]): r for r in json.loads((report.parent / "summary.json").read_text())["rows"]}
    layernorm = rows[("test_accuracy", "layernorm")]
    assert layernorm["ci_outside_bounds"] and layernorm["ci_low"] is None
    assert rows[("test_accuracy", "adanorm")]["diff_ci_outside_bounds"]  # the Δ interval would leave [-1, 1]
    text = report.read_text()
    line = next(l for l in text.split("## test_accuracy\n")[1].splitlines() if l.startswith("| layernorm |"))
    assert "n too small †" in line and "-4.0" not in text
    assert ("with 2 seeds no difference in test_accuracy was detectable: it would take |Δ| > 6.7, beyond the "
            "metric's range") in text.split("**Read with care.**")[0]
    assert "† n too small: the t interval would leave the metric's range" in text


def clear_gain(norm, seed):
    rng = np.random.default_rng([seed, len(norm)])
    return dict(eval_accuracy=0.7 + (0.1 if norm == "adanorm" else 0.0) + float(rng.normal(0, 0.005)),
                eval_loss=0.5 + float(rng.normal(0, 0.01)))


def five_more_right_of_500(norm, seed):
    """Every seed gets exactly 5 more test sentences right with adanorm: the same Δ of 0.01, which floats
    give as 0.010000000000000009 or 0.009999999999999898 depending on the accuracies."""
    right = {0: 350, 1: 405, 2: 356}[seed] + (5 if norm == "adanorm" else 0)
    return dict(test_accuracy=right / 500)


def test_the_same_difference_in_every_seed_is_not_a_spread_of_round_off(tmp_path):
    diffs = [five_more_right_of_500("adanorm", s)["test_accuracy"] - five_more_right_of_500("layernorm", s)[
        "test_accuracy"] for s in range(3)]
    assert np.ptp(diffs) > 0, "the fixture should give float differences that are not equal"
    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=FixedRun(five_more_right_of_500),
                     progress=False)
    row = next(r for r in json.loads((report.parent / "summary.json").read_text())["rows"] if r["norm"] == "adanorm")
    assert row["t_pvalue"] is None and row["mde"] is None and row["diff_std"] == 0.0
    assert row["mean_diff"] == pytest.approx(0.01)
    assert row["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon([0.01] * 3).pvalue)
    verdict = report.read_text().split("**Read with care.**")[0]
    assert "every seed gave the same Δ test_accuracy = +0.01: with no spread" in verdict and "differs" not in verdict


def test_one_seed_of_huge_values_does_not_swallow_the_others_differences():
    from hf_adanorm.compare.stats import paired_vs_baseline
    values = {0: 10.0, 1: 10.3, 2: 9.8, 3: 1.6e15}  # seed 3 nearly diverged: a perplexity of 1.6e15 in both
    baseline = {0: 10.2, 1: 10.2, 2: 10.1, 3: 1.6e15 + 0.25}  # (one ulp apart there)
    row = paired_vs_baseline(values, baseline)
    diffs = [-0.2, 0.1, -0.3, 0.0]  # seed 3's difference is round-off of its own magnitude
    assert row["t_pvalue"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-6)
    assert row["diff_std"] == pytest.approx(np.std(diffs, ddof=1), rel=1e-6)


def one_seed_diverged(norm, seed):
    loss = math.nan if (norm, seed) == ("adanorm", 1) else 2.0 + 0.01 * seed + (0.05 if norm == "adanorm" else 0)
    return dict(eval_loss=loss, eval_bpc=loss / math.log(2))


def test_a_diverged_run_is_named_not_read_as_no_spread(tmp_path):
    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=FixedRun(one_seed_diverged),
                     progress=False)
    rows = {(r["metric"], r["norm"]): r for r in json.loads((report.parent / "summary.json").read_text())["rows"]}
    assert rows[("eval_bpc", "adanorm")]["nonfinite_seeds"] == [1] and rows[("eval_bpc", "layernorm")][
        "nonfinite_seeds"] == []
    assert rows[("eval_bpc", "adanorm")]["t_pvalue"] is None and rows[("eval_bpc", "adanorm")]["mean"] is None
    verdict = report.read_text().split("**Read with care.**")[0]
    assert "**⚠ 1 of 6 runs ended with a metric that is not a number** (adanorm seed 1: eval_loss, eval_bpc)" in verdict
    assert "adanorm seed 1 diverged (eval_bpc is not a number)" in verdict
    assert "same Δ" not in verdict


def test_runs_that_saw_different_data_are_flagged_not_averaged(tmp_path):
    def majority_differs(norm, seed):
        return dict(test_accuracy=0.6, test_majority_accuracy=0.44 if seed == 0 else 0.56, test_predicted_classes=1)

    text = compare(SETUP, ["layernorm"], [0, 1], tmp_path, run_fn=FixedRun(majority_differs), progress=False).read_text()
    assert "baseline (⚠ 0.44 / 0.56: the runs did not all see the same test data)" in text
    assert "0.5)" not in text and "0.5." not in text


def nominal_only(norm, seed):
    """adanorm 0.01 above in every seed but with some spread: p < 0.05 alone, not after Holm over 4 tests."""
    rng = np.random.default_rng([seed, len(norm)])
    gain = {"adanorm": 0.012 + float(rng.normal(0, 0.0025))}.get(norm, 0.0)
    return dict(eval_accuracy=0.7 + gain + (0.02 * seed), eval_loss=0.5 + float(rng.normal(0, 0.05)),
                eval_f1=0.6 + float(rng.normal(0, 0.05)), eval_other=float(rng.normal(0, 0.05)))


def test_a_nominal_difference_that_holm_takes_back_is_said_in_the_verdict(tmp_path):
    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=FixedRun(nominal_only),
                     progress=False)
    rows = {(r["metric"], r["norm"]): r for r in json.loads((report.parent / "summary.json").read_text())["rows"]}
    row = rows[("eval_accuracy", "adanorm")]
    assert row["t_pvalue"] < 0.05 <= row["t_pvalue_holm"], "the fixture should be nominal only"
    verdict = report.read_text().split("**Read with care.**")[0]
    assert "**adanorm**: no difference from layernorm detected" in verdict
    assert (f"nominally eval_accuracy Δ = {row['mean_diff']:+.3g} (unadjusted p = {row['t_pvalue']:.2g}, its 95% CI "
            "excludes 0), not significant once adjusted for the tests made") in verdict


def test_a_sweep_of_the_baseline_alone_says_there_is_nothing_to_compare(tmp_path):
    report = compare(SETUP, ["layernorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    assert "- Only `layernorm` ran: there is nothing to compare it with." in report.read_text().split("**Read")[0]


def test_the_verdict_follows_from_the_numbers(tmp_path):
    report = compare(SETUP, ["layernorm", "layernorm_simple", "adanorm"], [0, 1, 2, 3], tmp_path,
                     run_fn=FixedRun(clear_gain), progress=False)
    rows = {(r["metric"], r["norm"]): r for r in json.loads((report.parent / "summary.json").read_text())["rows"]}
    verdict = report.read_text().split("**Read with care.**")[0]
    gain = rows[("eval_accuracy", "adanorm")]
    assert gain["t_pvalue_holm"] < 0.05
    assert (f"**adanorm** differs from layernorm on eval_accuracy (Δ = {gain['mean_diff']:+.3g}, Holm-adjusted "
            f"p = {gain['t_pvalue_holm']:.2g})") in verdict
    simple = rows[("eval_accuracy", "layernorm_simple")]
    assert ("**layernorm_simple**: no difference from layernorm detected (Holm-adjusted paired t p ≥ 0.05 over the 4 "
            f"tests of this report); with 4 seeds only |Δ| > {simple['mde']:.2g} in eval_accuracy was detectable") in verdict
    assert simple["mde"] == pytest.approx(min_detectable_effect(simple["diff_std"], 4))


@pytest.mark.slow
def test_the_sweep_folder_is_locked_and_recovered_after_kill_9(tmp_path, capsys):
    fake = FakeRun()
    holder = hold_lock(tmp_path / "sweep", "hf-adanorm compare")
    try:
        with pytest.raises(FolderInUseError, match=f"in use by another hf-adanorm compare: pid {holder.pid}"):
            run_sweep(SETUP, ["layernorm"], [0], tmp_path / "sweep", run_fn=fake, progress=False)
        assert fake.calls == [] and not (tmp_path / "sweep" / "sweep.json").exists()
        assert main(["compare", "--output-dir", str(tmp_path / "sweep"), "--no-progress"]) == 2  # the demo
        assert not (tmp_path / "sweep" / "data").exists()  # refused before the demo wrote its data
        assert f"in use by another hf-adanorm compare: pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    compare(SETUP, ["layernorm"], [0], tmp_path / "sweep", run_fn=fake, progress=False)
    assert fake.calls == [("layernorm", 0)]


def test_overwrite_starts_the_sweep_afresh(tmp_path):
    fake = FakeRun()
    run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=fake, progress=False)
    (tmp_path / "data").mkdir()  # the demo's data: kept
    other = dict(SETUP, learning_rate=0.5)
    with pytest.raises(ValueError, match="other training options"):
        run_sweep(other, ["layernorm"], [0], tmp_path, run_fn=fake, progress=False)
    runs = run_sweep(other, ["layernorm"], [0], tmp_path, run_fn=fake, progress=False, overwrite=True)
    assert fake.calls[2:] == [("layernorm", 0)] and len(runs) == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["layernorm_seed0"]
    assert json.loads((tmp_path / "sweep.json").read_text())["learning_rate"] == 0.5 and (tmp_path / "data").is_dir()


def test_cli_passes_overwrite_output_dir_on(tmp_path, monkeypatch):
    import hf_adanorm.compare as compare_module
    seen = {}

    def fake_compare(setup, norms, seeds, output_dir, run_fn=None, progress=True, overwrite=False,
                     conversion=None):
        seen["overwrite"] = overwrite
        assert conversion is None  # no --convert
        (tmp_path / "report.md").write_text("fake")
        return tmp_path / "report.md"

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    argv = ["compare", "--model", str(tmp_path), "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 0 and seen == {"overwrite": False}
    assert main([*argv, "--overwrite_output_dir"]) == 0 and seen == {"overwrite": True}


def test_cli_reruns_a_convert_sweep_in_its_folder(tmp_path, monkeypatch, capsys):
    """sweep.json records the conversion options beside the setup; the CLI's early check must
    compare against the same record, or a rerun (a resume, more seeds) of any --convert sweep
    is refused as 'other training options'."""
    import hf_adanorm.compare as compare_module
    calls = []

    def fake_compare(setup, norms, seeds, output_dir, run_fn=None, progress=True, overwrite=False,
                     conversion=None):
        calls.append((list(seeds), conversion))
        run_sweep(setup, norms, seeds, output_dir, run_fn=FakeRun(), progress=False, conversion=conversion)
        (tmp_path / "report.md").write_text("fake")
        return tmp_path / "report.md"

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    argv = ["compare", "--model", str(tmp_path), "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "o"),
            "--norms", "layernorm", "adanorm", "--convert", "--convert-options", '{"max_steps": 5}']
    assert main([*argv, "--seeds", "0"]) == 0
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["convert"] == {"max_steps": 5}
    assert main([*argv, "--seeds", "0", "1"]) == 0, capsys.readouterr().err  # more seeds, same sweep
    assert calls == [([0], {"max_steps": 5}), ([0, 1], {"max_steps": 5})]
    other = [*argv[:-1], '{"max_steps": 6}', "--seeds", "0"]
    assert main(other) == 2 and "other training options (convert" in capsys.readouterr().err
    assert main([*argv[:-2], "--seeds", "0"]) == 2  # the same folder without --convert
    per_arm = [*argv[:-1], '{"norm": "layernorm_simple"}', "--seeds", "0", "--output-dir", str(tmp_path / "p")]
    assert main(per_arm) == 2 and "the sweep sets them per norm" in capsys.readouterr().err
    assert len(calls) == 2 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "4294967296"], r"seeds must be non-negative integers up to 2\*\*32 - 1"),
    (["--output-dir", ""], "the sweep folder is empty"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be a finite number > 0"),
    (["--learning_rate", "nan"], "learning_rate must be a finite number > 0"),
    (["--lr_scheduler", "bogus"], "unknown lr_scheduler 'bogus'"),
])
def test_cli_refuses_before_writing_anything(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # '' would be the current folder
    out = ["--output-dir", str(tmp_path / "o")] if "--output-dir" not in argv else []
    assert main(["compare", "--no-progress", *out, *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compare", "--output-dir", str(tmp_path / "notes.txt")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_paired_plot_shows_each_seeds_difference_and_the_paired_interval(tmp_path, monkeypatch):
    """paired_*.png draws what the tests are made on: per seed norm − baseline, and the mean Δ with its
    paired CI (the final_*.png intervals are each norm's own and can overlap where this one excludes 0)."""
    from matplotlib.collections import LineCollection, PathCollection

    from hf_adanorm.compare import plots
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path
    monkeypatch.setattr(plots, "_save", keep)
    report = compare(SETUP, ["layernorm", "layernorm_simple", "adanorm"], [0, 1, 2, 3], tmp_path,
                     run_fn=FixedRun(clear_gain), progress=False)
    assert "![paired_eval_accuracy](paired_eval_accuracy.png)" in report.read_text()
    rows = {(r["metric"], r["norm"]): r for r in json.loads((report.parent / "summary.json").read_text())["rows"]}
    ax = figures["paired_eval_accuracy.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layernorm_simple", "adanorm"]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    whiskers = [c for c in ax.collections if isinstance(c, LineCollection)]
    for i, norm in enumerate(["layernorm_simple", "adanorm"]):
        expected = sorted(clear_gain(norm, s)["eval_accuracy"] - clear_gain("layernorm", s)["eval_accuracy"]
                          for s in range(4))
        dots = sorted(float(y) for x, y in scatters[i].get_offsets())
        assert dots == pytest.approx(expected, abs=1e-12)
        row = rows[("eval_accuracy", norm)]
        assert row["diff_ci_low"] < row["mean_diff"] < row["diff_ci_high"]
        ends = sorted(float(y) for seg in whiskers[i].get_segments() for _, y in seg)
        assert ends[0] == pytest.approx(row["diff_ci_low"]) and ends[-1] == pytest.approx(row["diff_ci_high"])
    assert "paired_eval_accuracy.png" in figures and "final_eval_accuracy.png" in figures
    # without the baseline there are no pairs, so no paired plot
    figures.clear()
    compare(SETUP, ["adanorm"], [0, 1], tmp_path / "alone", run_fn=FixedRun(clear_gain), progress=False)
    assert not [name for name in figures if name.startswith("paired_")] and "final_eval_accuracy.png" in figures


def test_ctrl_c_says_what_is_kept_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    """A Ctrl-C printed a traceback: it now says what was kept and how to go on, and exits 130."""
    import hf_adanorm.compare.sweep as sweep_module
    fake = FakeRun()

    def interrupted_at_the_second_run(options):
        if len(fake.calls) == 1:
            raise KeyboardInterrupt
        return fake(options)

    monkeypatch.setattr(sweep_module, "run_in_process", interrupted_at_the_second_run)
    argv = ["compare", "--model", str(tmp_path), "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "o"),
            "--norms", "layernorm", "adanorm", "--seeds", "0", "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "hf-adanorm compare: interrupted. Finished runs are kept" in err and "Traceback" not in err
    monkeypatch.setattr(sweep_module, "run_in_process", fake)
    assert main(argv) == 0
    assert fake.calls == [("layernorm", 0), ("adanorm", 0)], "the rerun should train only the interrupted run"


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if ".lock" not in p.name}


def test_overwrite_deletes_only_what_a_sweep_wrote(tmp_path):
    """--overwrite_output_dir deleted runs/ and report/ whatever they held: a user's report/thesis.tex and
    runs/exp1.log went with them."""
    fake = FakeRun()
    home = tmp_path / "home"
    (home / "report").mkdir(parents=True)
    (home / "report" / "thesis.tex").write_text("years of work")
    (home / "runs").mkdir()
    (home / "runs" / "exp1.log").write_text("mine")
    before = _tree(home)
    with pytest.raises(ValueError, match=r"would delete .*home/runs, which holds files a sweep does not write "
                                         r"\(exp1\.log\)"):
        run_sweep(SETUP, ["layernorm"], [0], home, run_fn=fake, progress=False, overwrite=True)
    assert _tree(home) == before and fake.calls == []
    # a sweep's own folders are deleted, and a link to runs/ is removed, not what it points to
    sweep = tmp_path / "sweep"
    run_sweep(SETUP, ["layernorm"], [0], sweep, run_fn=fake, progress=False)
    elsewhere = tmp_path / "elsewhere"
    (sweep / "runs").rename(elsewhere)
    (sweep / "runs").symlink_to(elsewhere, target_is_directory=True)
    run_sweep(SETUP, ["layernorm"], [0], sweep, run_fn=fake, progress=False, overwrite=True)
    assert (elsewhere / "layernorm_seed0" / METRICS_FILE).is_file() and not (sweep / "runs").is_symlink()


@pytest.mark.parametrize("where", ["model in runs", "dataset is the sweep folder"])
def test_an_input_inside_what_the_sweep_writes_is_refused_before_any_write(tmp_path, where):
    """--model sweep/runs/layernorm_seed0/model with --overwrite_output_dir deleted the model, then said it did
    not exist; a --dataset folder of .txt files as the sweep folder got sweep.json, which broke the data."""
    fake = FakeRun()
    sweep = tmp_path / "sweep"
    run_sweep(SETUP, ["layernorm"], [0], sweep, run_fn=fake, progress=False)
    (sweep / "runs" / "layernorm_seed0" / "model").mkdir()
    (sweep / "novel.txt").write_text("It is a truth universally acknowledged.")
    setup = (dict(SETUP, model=str(sweep / "runs" / "layernorm_seed0" / "model")) if where == "model in runs"
             else dict(SETUP, dataset=str(sweep)))
    before = _tree(sweep)
    with pytest.raises(ValueError, match=r"is (inside )?.*which this sweep writes \(--output-dir"):
        run_sweep(setup, ["layernorm"], [0], sweep, run_fn=fake, progress=False, overwrite=True)
    assert _tree(sweep) == before


def test_a_torn_sweep_json_gets_a_clear_message(tmp_path):
    run_sweep(SETUP, ["layernorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)
    (tmp_path / "sweep.json").write_text("")  # what an older hf_adanorm killed mid-write left
    with pytest.raises(ValueError, match="sweep.json is not readable JSON .* start afresh with --overwrite_output_dir"):
        run_sweep(SETUP, ["layernorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)


@pytest.mark.parametrize("flag", [["--no-progress"], []])
def test_no_progress_hides_every_runs_bar_and_restores_the_environment(tmp_path, monkeypatch, flag):
    """--no-progress hid the sweep's bar only: each run's training bar passed disable=False to tqdm."""
    import hf_adanorm.compare.sweep as sweep_module
    fake, seen = FakeRun(), []

    def recording(options):
        seen.append(os.environ.get("TQDM_DISABLE"))
        return fake(options)

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sweep_module, "run_in_process", recording)
    assert main(["compare", "--model", str(tmp_path), "--dataset", str(tmp_path), "--output-dir",
                 str(tmp_path / "o"), "--norms", "layernorm", "adanorm", "--seeds", "0", *flag]) == 0
    assert seen == (["1", "1"] if flag else [None, None])
    assert "TQDM_DISABLE" not in os.environ


def test_the_training_bar_follows_tqdm_disable(tmp_path, monkeypatch, capfd):
    from test_recipes import tiny_args

    from hf_adanorm.training import TrainingArgs, run_training
    for disable, expected in (("1", False), (None, True)):
        if disable:
            monkeypatch.setenv("TQDM_DISABLE", disable)
        else:
            monkeypatch.delenv("TQDM_DISABLE", raising=False)
        run_training(TrainingArgs(**tiny_args(tmp_path, num_epochs=1, output_dir=str(tmp_path / f"run{disable}"))))
        assert ("classification [adanorm]" in capfd.readouterr().err) is expected

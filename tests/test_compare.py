"""The comparison: the sweep resumes, and the report's numbers are what the runs say."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hf_adanorm.cli import main
from hf_adanorm.compare import compare, run_sweep
from hf_adanorm.compare.report import launch_text
from hf_adanorm.compare.sweep import METRICS_FILE, RESULTS_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeRun:
    """Stands in for a training run: writes a metrics.json whose numbers depend on norm and seed."""

    def __init__(self):
        self.calls = []

    def __call__(self, options):
        self.calls.append((options["norm"], options["seed"]))
        rng = np.random.default_rng([options["seed"], len(options["norm"])])
        shift = {"layernorm": 0.0, "layernorm_simple": 0.01, "adanorm": 0.02}.get(options["norm"], -0.01)
        history = [dict(epoch=e, step=10 * e, train_loss=float(1 / e + rng.normal(0, 0.05)),
                        eval_accuracy=float(0.5 + 0.1 * e + shift + rng.normal(0, 0.01)))
                   for e in (1, 2, 3)]
        final = dict(eval_accuracy=history[-1]["eval_accuracy"], eval_loss=float(0.3 - shift + rng.normal(0, 0.02)))
        path = f"{options['output_dir']}/{METRICS_FILE}"
        __import__("os").makedirs(options["output_dir"], exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(config=options, history=history, final=final, results_version=RESULTS_VERSION), f)
        return final


SETUP = dict(model="tiny", dataset="fake", learning_rate=1e-3)


def test_sweep_skips_finished_runs(tmp_path):
    fake = FakeRun()
    runs = run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=fake, progress=False)
    assert len(fake.calls) == 4 and len(runs) == 4
    run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=fake, progress=False)
    assert len(fake.calls) == 4  # nothing ran again
    (tmp_path / "runs" / "adanorm_seed1" / METRICS_FILE).unlink()  # as if killed mid-run
    run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=fake, progress=False)
    assert fake.calls[4:] == [("adanorm", 1), ("layernorm", 2), ("adanorm", 2)]


@pytest.mark.parametrize("per_run", ["seed", "output_dir", "overwrite_output_dir"])
def test_sweep_sets_the_per_run_options_itself(tmp_path, per_run):
    with pytest.raises(ValueError, match="set per run by the sweep"):
        run_sweep(dict(SETUP, **{per_run: 1}), ["layernorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)
    assert not any(tmp_path.iterdir())


def test_a_sweep_whose_first_run_failed_takes_the_corrected_options(tmp_path):
    def fails(options):
        raise ValueError("no column ['text']")

    with pytest.raises(ValueError, match="no column"):  # found only once the run reads the data
        run_sweep(SETUP, ["layernorm"], [0], tmp_path, run_fn=fails, progress=False)
    fixed = FakeRun()
    run_sweep(dict(SETUP, text_column="sentence"), ["layernorm"], [0], tmp_path, run_fn=fixed, progress=False)
    assert fixed.calls == [("layernorm", 0)]


def test_sweep_refuses_to_mix_other_training_options(tmp_path):
    run_sweep(SETUP, ["layernorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)
    with pytest.raises(ValueError, match="learning_rate.*new --output-dir"):
        run_sweep(dict(SETUP, learning_rate=1e-2), ["layernorm"], [0], tmp_path, run_fn=FakeRun(),
                  progress=False)


def test_sweep_refuses_to_mix_runs_on_other_data(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngood,1\nbad,0\n")
    setup = dict(SETUP, dataset=str(data))
    run_sweep(setup, ["layernorm"], [0], tmp_path / "sweep", run_fn=FakeRun(), progress=False)
    run_sweep(setup, ["layernorm"], [0, 1], tmp_path / "sweep", run_fn=FakeRun(), progress=False)  # the same data
    data.write_text("text,label\ngood,0\nbad,1\n")  # the labels flipped, at the same path
    fake = FakeRun()
    with pytest.raises(ValueError, match="trained and tested on other data: the files of --dataset .*data.csv have "
                                         "changed since.*--overwrite_output_dir"):
        run_sweep(setup, ["layernorm"], [0, 1, 2], tmp_path / "sweep", run_fn=fake, progress=False)
    assert fake.calls == []
    run_sweep(setup, ["layernorm"], [0], tmp_path / "sweep", run_fn=fake, progress=False, overwrite=True)
    assert fake.calls == [("layernorm", 0)]
    data.unlink()  # data that is gone is not other data (the demo writes its own again before its runs)
    run_sweep(setup, ["layernorm"], [0], tmp_path / "sweep", run_fn=fake, progress=False)


class LaunchedRun(FakeRun):
    """A FakeRun that also writes run_config.json as launched with ``world_size`` processes."""

    def __init__(self, world_size):
        super().__init__()
        self.world_size = world_size

    def __call__(self, options):
        final = super().__call__(options)
        with open(f"{options['output_dir']}/run_config.json", "w") as f:
            json.dump(dict(args=options, world_size=self.world_size, distributed_type="DistributedType.MULTI_CPU",
                           mixed_precision="no"), f)
        return final


class LegacyRun(FakeRun):
    """A FakeRun as an hf_adanorm from before results_version wrote it: no version (1)."""

    def __call__(self, options):
        final = super().__call__(options)
        path = Path(options["output_dir"]) / METRICS_FILE
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "results_version"}))
        return final


def test_sweep_refuses_to_pair_runs_scored_by_another_version(tmp_path):
    """A sweep started by an older hf_adanorm (macro-F1 over the predicted classes, unrecorded: version 1) and
    continued by this one would pair runs scored two ways."""
    run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=LegacyRun(), progress=False)
    now = FakeRun()
    with pytest.raises(ValueError, match=rf"versions of hf_adanorm that compute or score a run differently \(version 1: "
                                         rf"layernorm seed 0, adanorm seed 0; version {RESULTS_VERSION}: layernorm "
                                         rf"seed 1; this one makes version {RESULTS_VERSION}\)"):
        run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=now, progress=False)
    assert now.calls == [], "the sweep should stop before the first run it would score the other way"
    # an old sweep on its own is still reported, and so is one made wholly by this version
    assert len(run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=LegacyRun(), progress=False)) == 2
    runs = run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path / "new", run_fn=now, progress=False)
    assert {r["results_version"] for r in runs} == {RESULTS_VERSION}


def test_sweep_refuses_to_mix_runs_launched_differently(tmp_path):
    run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=LaunchedRun(1), progress=False)
    two = LaunchedRun(2)  # the rerun under another accelerate config: the same options, twice the global batch
    with pytest.raises(ValueError, match=r"launched differently \(layernorm seed 0, adanorm seed 0: world_size=1.*; "
                                         r"layernorm seed 1: world_size=2"):
        run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1, 2], tmp_path, run_fn=two, progress=False)
    assert two.calls == [("layernorm", 1)], "the sweep should stop at the first run launched the other way"
    runs = run_sweep(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path / "alike", run_fn=LaunchedRun(2),
                     progress=False)
    assert launch_text(runs) == "Every run was launched with 2 processes, distributed type `MULTI_CPU`, mixed precision `no`."
    assert launch_text([{**r, "launch": {}} for r in runs]) is None  # runs from before run_config.json said it


def test_failed_run_stops_the_sweep_and_keeps_finished_runs(tmp_path):
    fake = FakeRun()

    def flaky(options):
        if options["norm"] == "adanorm":
            raise RuntimeError("out of memory")
        return fake(options)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_sweep(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=flaky, progress=False)
    assert (tmp_path / "runs" / "layernorm_seed0" / METRICS_FILE).is_file()
    with pytest.raises(RuntimeError, match="without writing"):
        run_sweep(SETUP, ["adanorm"], [0], tmp_path, run_fn=lambda options: None, progress=False)


def _recompute(values, base):
    """Independent recomputation of one report row from the raw per-seed values."""
    x = np.array(values)
    n = len(x)
    std = x.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    row = dict(n=n, mean=x.mean(), std=std, ci_low=x.mean() - half, ci_high=x.mean() + half)
    if base is not None:
        d = x - np.array(base)
        dhalf = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
        row.update(mean_diff=d.mean(), diff_ci_low=d.mean() - dhalf, diff_ci_high=d.mean() + dhalf,
                   t_pvalue=2 * stats.t.sf(abs(t), n - 1),
                   wilcoxon_pvalue=stats.wilcoxon(d).pvalue)
    return row


def test_report_numbers_equal_a_recomputation_from_the_run_json(tmp_path):
    norms, seeds = ["layernorm", "layernorm_simple", "adanorm"], [0, 1, 2, 3]
    report = compare(SETUP, norms, seeds, tmp_path, run_fn=FakeRun(), progress=False)

    raw = {}  # (norm, metric) -> values in seed order, read from the per-run files only
    for norm in norms:
        for seed in seeds:
            final = json.loads((tmp_path / "runs" / f"{norm}_seed{seed}" / METRICS_FILE).read_text())["final"]
            for metric, value in final.items():
                raw.setdefault((norm, metric), []).append(value)

    summary = json.loads((report.parent / "summary.json").read_text())["rows"]
    assert {(r["norm"], r["metric"]) for r in summary} == set(raw)
    markdown = report.read_text()
    recomputed = {(row["norm"], row["metric"]): _recompute(
        raw[(row["norm"], row["metric"])], None if row["norm"] == "layernorm" else raw[("layernorm", row["metric"])])
        for row in summary}
    for test in ("t_pvalue", "wilcoxon_pvalue"):  # Holm over all (norm, metric) pairs: 2 norms x 2 metrics
        family = {key: row[test] for key, row in recomputed.items() if test in row}
        assert len(family) == 4
        for key, p in family.items():  # adjusted p_i = max over p_j <= p_i of min(1, (K - rank_j) p_j)
            ranked = sorted(family.values())
            recomputed[key][f"{test}_holm"] = max(min(1.0, (len(ranked) - ranked.index(q)) * q)
                                                  for q in ranked if q <= p)
    for row in summary:
        base = None if row["norm"] == "layernorm" else raw[("layernorm", row["metric"])]
        expected = recomputed[(row["norm"], row["metric"])]
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (row["norm"], row["metric"], key)
        # The markdown line shows the same numbers, rounded to 4 (p-values 3) significant digits.
        section = markdown.split(f"## {row['metric']}\n")[1].split("\n## ")[0]
        line = next(l for l in section.splitlines() if l.startswith(f"| {row['norm']} |"))
        shown = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", line.split("|", 2)[2])]
        wanted = [expected["n"], expected["mean"], expected["std"], expected["ci_low"], expected["ci_high"]]
        if base is not None:
            wanted += [expected["mean_diff"], expected["diff_ci_low"], expected["diff_ci_high"], len(base),
                       expected["t_pvalue"], expected["t_pvalue_holm"], expected["wilcoxon_pvalue"],
                       expected["wilcoxon_pvalue_holm"], row["mde"]]  # the MDE: see test_compare_report.py
        assert len(shown) == len(wanted), line
        for i, (got, want) in enumerate(zip(shown, wanted)):  # p-values and the MDE: the last five (3 digits)
            rel = 5e-3 if base is not None and i >= len(wanted) - 5 else 5e-4
            assert got == pytest.approx(want, rel=rel, abs=1e-12), line

    table = (report.parent / "runs.csv").read_text().splitlines()
    assert len(table) == 1 + len(norms) * len(seeds)
    runs_json = json.loads((report.parent / "runs.json").read_text())
    assert sorted((r["norm"], r["seed"]) for r in runs_json) == sorted((n, s) for n in norms for s in seeds)
    assert "Read with care" in markdown and "Runs (seeds) per norm: layernorm 4" in markdown


def test_plots_are_valid_pngs(tmp_path):
    import matplotlib.image

    report = compare(SETUP, ["layernorm", "adanorm"], [0, 1], tmp_path, run_fn=FakeRun(), progress=False)
    names = sorted(p.name for p in report.parent.glob("*.png"))
    assert names == ["curve_eval_accuracy.png", "curve_train_loss.png", "final_eval_accuracy.png",
                     "final_eval_loss.png", "paired_eval_accuracy.png", "paired_eval_loss.png"]
    for name in names:
        path = report.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # decodes, not blank
        assert f"({name})" in report.read_text()  # linked from report.md


def test_report_without_baseline_omits_the_paired_columns(tmp_path):
    report = compare(SETUP, ["adanorm", "layernorm_simple"], [0, 1], tmp_path, run_fn=FakeRun(),
                     progress=False)
    text = report.read_text()
    assert "paired t p" not in text and "No `layernorm` runs" in text
    rows = json.loads((report.parent / "summary.json").read_text())["rows"]
    assert all("t_pvalue" not in r for r in rows)


def test_single_seed_has_no_interval_and_says_so(tmp_path):
    report = compare(SETUP, ["layernorm", "adanorm"], [0], tmp_path, run_fn=FakeRun(), progress=False)
    rows = json.loads((report.parent / "summary.json").read_text())["rows"]
    assert all(r["ci_low"] is None or math.isnan(r["ci_low"]) for r in rows)
    assert "one seed there is no spread" in report.read_text()


@pytest.mark.parametrize("norms, seeds, message", [
    (["layernorm", "adanrom"], [0], "unknown norm.*adanrom.*choose from"),
    ([], [0], "no norms"),
    (["adanorm"], [], "at least one seed"),
    (["adanorm"], [0, 0], "each seed once"),
    (["adanorm"], [-1], "non-negative"),
])
def test_bad_plans_fail_before_anything_runs(tmp_path, norms, seeds, message):
    fake = FakeRun()
    with pytest.raises(ValueError, match=message):
        run_sweep(SETUP, norms, seeds, tmp_path / "out", run_fn=fake, progress=False)
    assert fake.calls == [] and not (tmp_path / "out").exists()


def test_cli_rejects_a_norm_typo_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--norms", "layernorm", "adanrom", "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "adanrom" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "-1"], "non-negative"),
    (["--norm", "adanorm"], "compare takes --norms"),
    (["--model", "some/model"], "--model needs --dataset"),
    (["--num_epochs", "0"], "num_epochs must be >= 1"),
    (["--accelerate-config", "x.yaml"], "needs --launcher accelerate"),
    (["--launcher", "accelerate", "--accelerate-config", "missing.yaml"], "accelerate config missing.yaml not found"),
])
def test_cli_bad_options_fail_before_anything_is_written(tmp_path, capsys, argv, message):
    assert main(["compare", *argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_end_to_end_tiny_digits_sweep_resumes(tmp_path, capsys):
    """The real thing, shrunk: the built-in digits demo, 2 norms x 2 seeds, 3 steps per run."""
    from hf_adanorm.training import METRICS_FILE as WRITTEN_BY_TRAINING

    assert METRICS_FILE == WRITTEN_BY_TRAINING
    out = tmp_path / "sweep"
    argv = ["compare", "--norms", "layernorm", "adanorm", "--seeds", "0", "1", "--output-dir", str(out),
            "--max_steps", "3", "--max_eval_samples", "40", "--no-progress"]
    assert main(argv) == 0
    runs = json.loads((out / "report" / "runs.json").read_text())
    assert sorted((r["norm"], r["seed"]) for r in runs) == [("adanorm", 0), ("adanorm", 1),
                                                            ("layernorm", 0), ("layernorm", 1)]
    for r in runs:
        metrics = json.loads((out / "runs" / f"{r['norm']}_seed{r['seed']}" / METRICS_FILE).read_text())
        assert metrics["config"]["norm"] == r["norm"] and metrics["config"]["seed"] == r["seed"]
        assert metrics["history"][-1]["step"] == 3 and r["final"] == metrics["final"]
        assert 0 <= r["final"]["test_accuracy"] <= 1
    # seeds differ, so the runs do too (paired by seed, not copies of one another)
    assert runs[0]["final"]["eval_loss"] != runs[2]["final"]["eval_loss"]
    assert "## test_accuracy" in (out / "report" / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/" + METRICS_FILE)}
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert "4 of 4 runs already finished" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/" + METRICS_FILE)}
    # killed after writing model/ but before metrics.json: that run (only) is trained afresh
    cut_off = out / "runs" / "adanorm_seed1"
    (cut_off / METRICS_FILE).unlink()
    (cut_off / "model").mkdir()
    assert main(argv) == 0
    assert "3 of 4 runs already finished" in capsys.readouterr().out
    assert (cut_off / METRICS_FILE).is_file() and not (cut_off / "model").exists()  # save_model=False


@pytest.mark.slow
def test_accelerate_launcher_runs_each_run_as_its_own_job(tmp_path):
    """--launcher accelerate: a real `accelerate launch` per run, options passed intact (None too)."""
    from hf_adanorm.compare.default import default_setup, write_digits_csv
    from hf_adanorm.compare.sweep import accelerate_runner

    config = tmp_path / "one_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\n"
                      "num_processes: 1\nmixed_precision: 'no'\nuse_cpu: true\n")
    setup = dict(default_setup(tmp_path), max_steps=2, max_eval_samples=20, max_grad_norm=None)
    write_digits_csv(setup["dataset"])
    runs = run_sweep(setup, ["adanorm"], [1], tmp_path, run_fn=accelerate_runner(config), progress=False)
    config_used = json.loads((tmp_path / "runs" / "adanorm_seed1" / METRICS_FILE).read_text())["config"]
    assert config_used == dict(config_used, **setup, norm="adanorm", seed=1)  # max_grad_norm stayed None
    assert runs[0]["history"][-1]["step"] == 2
    with pytest.raises(FileNotFoundError, match="accelerate config"):
        accelerate_runner(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_accelerate_launcher_with_two_cpu_processes_per_run(tmp_path):
    """--launcher accelerate with recipes/configs/cpu_2proc.yaml: every run is one 2-rank gloo job."""
    from test_recipes import REPO, TINY_BERT, write_sentiment_csvs

    out = tmp_path / "sweep"
    argv = ["compare", "--model", "config:bert", "--tokenizer", "word", "--model_config", json.dumps(TINY_BERT),
            "--dataset", str(write_sentiment_csvs(tmp_path / "data", n_train=16, n_val=8)), "--cpu",
            "--launcher", "accelerate", "--accelerate-config", str(REPO / "recipes" / "configs" / "cpu_2proc.yaml"),
            "--norms", "layernorm", "adanorm", "--seeds", "0", "--max_steps", "2", "--per_device_batch_size", "4",
            "--max_length", "16", "--no_save_model", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    runs = json.loads((out / "report" / "runs.json").read_text())
    assert sorted(r["norm"] for r in runs) == ["adanorm", "layernorm"]
    for r in runs:
        folder = out / "runs" / f"{r['norm']}_seed0"
        run_config = json.loads((folder / "run_config.json").read_text())
        assert (run_config["world_size"], run_config["distributed_type"]) == (2, "DistributedType.MULTI_CPU")
        assert run_config["global_batch_size"] == 8 and run_config["args"]["norm"] == r["norm"]
        metrics = json.loads((folder / METRICS_FILE).read_text())
        assert metrics["world_size"] == 2 and metrics["history"][-1]["step"] == 2
        assert metrics["results_version"] == RESULTS_VERSION
        assert r["final"] == metrics["final"]  # the report was made from these runs
    report = (out / "report" / "report.md").read_text()
    assert "## eval_accuracy" in report
    assert ("Every run was launched with 2 processes, distributed type `MULTI_CPU`, mixed precision `no`, a global "
            "batch of 8 examples per optimizer step") in report

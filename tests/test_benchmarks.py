"""The end-to-end benchmark script runs and reports every variant (timings are not asserted)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.usefixtures("minilm_path")
def test_e2e_benchmark_reports_each_patched_minilm_against_the_unpatched_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_e2e")
    rows = bench.main(["--batch", "2", "--seq", "8", "--repeats", "5", "--budget", "0", "--out", str(tmp_path),
                       "--variants", "adanorm", "detachnorm_mean"])
    assert [r["variant"] for r in rows] == ["unpatched", "adanorm", "detachnorm_mean"]
    assert rows[0]["vs_unpatched"] == 1.0 and rows[0]["peak_vs_unpatched"] == 1.0
    assert all(r["step_ms"] > 0 and r["peak_bytes"] > 0 and r["repeats"] == 5 for r in rows)
    with open(tmp_path / "e2e.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["unpatched", "adanorm", "detachnorm_mean"]


@pytest.mark.slow
@pytest.mark.usefixtures("minilm_path")
@pytest.mark.parametrize("compile_mode", ["kernels", "math"])
def test_e2e_benchmark_of_compiled_models(compile_mode, tmp_path, monkeypatch, cpu_kernels_mode):
    """--compile: the compiled patched MiniLM against the compiled unpatched one; with "kernels"
    the compiled steps call the C++ kernels, with "math" they never do."""
    calls = cpu_kernels_mode("auto")
    from hf_adanorm import functional
    monkeypatch.setattr(functional, "COMPILED_NORMS", "auto")  # the benchmark sets it for "math"
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_e2e")
    import torch
    torch._dynamo.reset()
    rows = bench.main(["--batch", "2", "--seq", "8", "--repeats", "5", "--budget", "0", "--out", str(tmp_path),
                       "--variants", "adanorm", "--compile", compile_mode])
    torch._dynamo.reset()
    assert [r["variant"] for r in rows] == ["unpatched", "adanorm"] and rows[1]["step_ms"] > 0
    assert (tmp_path / f"e2e_compile_{compile_mode}.csv").exists()
    assert (calls["forward"] > 0 and calls["input_grad"] > 0) == (compile_mode == "kernels")


def test_norm_benchmark_reports_the_share_of_copy_bandwidth(tmp_path, monkeypatch, cpu_kernels_mode):
    """bench_norms.py times a same-dtype copy beside the norms, per thread count, and derives
    GB/s and the share of copy bandwidth (2.5 t_copy / t_full) from the same repeats."""
    cpu_kernels_mode("auto")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_norms")
    import torch
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--shapes", "64x40", "--dtypes", "bf16", "--threads", "1", "--paths", "cpu",
                           "--repeats", "7", "--budget", "0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert {r["norm"] for r in rows} >= {"nn.LayerNorm", *bench.BANDWIDTH_NORMS}
    for r in rows:
        assert (r["tokens"], r["hidden"], r["dtype"], r["threads"]) == (64, 40, "bfloat16", 1)
        copy_bytes = 2 * 64 * 40 * 2
        assert r["copy_gbs"] == pytest.approx(copy_bytes / r["copy_ms"] / 1e6)
        assert r["full_gbs"] == pytest.approx(2.5 * copy_bytes / r["full_ms"] / 1e6)
        assert 0 < r["full_share"] and 0 < r["fwd_share"] and 0 < r["bwd_share"]
    lines = bench.check_bandwidth_targets(rows)
    assert len(lines) == len(bench.BANDWIDTH_NORMS)
    assert all(line.startswith(("PASS", "MISS")) and "64x40 bfloat16 1 thread(s)" in line for line in lines)
    with open(tmp_path / "norms.csv") as f:
        assert "full_share" in next(csv.reader(f))


@pytest.mark.slow
@pytest.mark.usefixtures("minilm_path")
def test_gradual_swap_benchmark_fine_tunes_through_the_swap(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("gradual_swap_rt")
    import json
    import random
    rng = random.Random(0)
    words = "a gripping dull film long bright plot".split()
    for split, n in (("train", 48), ("test", 16)):
        rows = [(" ".join(rng.choice(words) for _ in range(6)), rng.randint(0, 1)) for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "\n".join(f'"{t}",{y}' for t, y in rows))
    results = bench.main(["--data", str(tmp_path), "--norm", "adanorm", "--ramp_steps", "2", "--max_steps", "3",
                          "--seeds", "0", "--out", str(tmp_path / "out")])
    assert list(results) == [0] and 0.0 <= results[0] <= 1.0
    saved = json.loads((tmp_path / "out" / "adanorm.json").read_text())
    assert saved["ramp_steps"] == 2 and saved["test_accuracy"]["0"] == results[0] and saved["rescale"] is False
    rescaled = bench.main(["--data", str(tmp_path), "--norm", "adanorm", "--ramp_steps", "2", "--max_steps", "3",
                           "--seeds", "0", "--out", str(tmp_path / "out"), "--rescale"])
    assert json.loads((tmp_path / "out" / "adanorm_rescaled.json").read_text())["test_accuracy"]["0"] == rescaled[0]


@pytest.mark.slow
def test_compiled_norms_benchmark_times_both_modes_and_restores_the_switch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_compiled_norms")
    from hf_adanorm import functional
    before = functional.COMPILED_NORMS
    rows = bench.main(["--shapes", "16x24", "--repeats", "2", "--variants", "adanorm", "--out", str(tmp_path)])
    assert functional.COMPILED_NORMS == before
    assert [r["variant"] for r in rows] == ["adanorm"] and rows[0]["kernels_ms"] > 0 and rows[0]["math_ms"] > 0
    assert (tmp_path / "compiled_norms_cpu.csv").is_file()


def test_interleaved_timing_rotates_the_order_so_no_step_always_follows_the_same_one(monkeypatch):
    """Each step runs once per repeat, and over len(steps) repeats after every other step once."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import interleaved
    calls = []
    times = interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=6, budget_s=0.0,
                        min_repeats=6)
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    repeats = [calls[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in repeats)
    predecessors = {(prev, cur) for prev, cur in zip(calls, calls[1:])}
    assert {p for p, c in predecessors if c == "b"} == {"a", "c"}  # b does not always follow a
    assert [r[0] for r in repeats] == ["a", "b", "c", "a", "b", "c"]

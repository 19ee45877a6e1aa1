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

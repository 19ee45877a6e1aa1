"""The Triton kernels of hf_adanorm.triton_norm against the paper's equations.

On a GPU they run compiled; without one, in Triton's interpreter (so CI checks their
numerics on CPU), and the ahead-of-time tests compile every variant for real NVIDIA
targets to prove the GPU compiler accepts them and vectorizes their memory accesses.
Skipped when Triton is not installed (``pip install triton``).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="pip install triton")

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it
    pytest.skip("no GPU, and Triton was not started in interpreter mode (TRITON_INTERPRET=1)",
                allow_module_level=True)

from hf_adanorm import functional, patch_model, triton_norm  # noqa: E402
from conftest import count_kernel_calls  # noqa: E402
from test_norms import VARIANTS, Variant, grad_of, reference, rows  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
NORMALIZING = [v for v in VARIANTS if not v.identity]  # NoNorm has no kernel
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture
def triton_calls(monkeypatch):
    """Send every tensor to the Triton kernels and count their launches."""
    monkeypatch.setattr(functional, "TRITON", "auto" if ON_GPU else "always")
    monkeypatch.setitem(functional._failures, "triton", None)
    return count_kernel_calls(monkeypatch, triton_norm)


def check_against_reference(variant: Variant, x, g, eps_mode, tol, eps=1e-5):
    z, dx = grad_of(variant.make(x.shape[-1], eps=eps, eps_mode=eps_mode), x, g)
    assert z.dtype == dx.dtype == x.dtype and z.device == x.device
    z_ref, dx_ref = grad_of(lambda t: reference(variant, t, eps, eps_mode), x.double().cpu(), g.double().cpu())
    # dL/dx is a sum of terms of size |g| / sigma that can cancel (for D = 2 it is ~0): compare
    # on the scale of those terms, or of dL/dx where it is larger.
    sigma = x.double().cpu().std(-1, correction=0).clamp_min(eps ** 0.5)
    grad_scale = max(dx_ref.abs().max().item(), (g.double().cpu().abs().amax(-1) / sigma).max().item())
    torch.testing.assert_close(z.double().cpu(), z_ref, rtol=tol, atol=tol * z_ref.abs().max().item())
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=tol, atol=tol * grad_scale)
    assert functional._failures["triton"] is None


@pytest.mark.parametrize("variant", NORMALIZING, ids=[v.id for v in NORMALIZING])
@pytest.mark.parametrize("eps_mode", ["torch", "fairseq"])
@pytest.mark.parametrize("shape,dtype", [((5, 37), torch.float32), ((2, 3, 1500), torch.bfloat16),
                                         ((4, 1023), torch.float16)], ids=["fp32-5x37", "bf16-2x3x1500",
                                                                           "fp16-4x1023"])
def test_kernels_match_the_equations(variant, eps_mode, shape, dtype, triton_calls):
    x = rows(*shape, seed=1)
    if dtype != torch.float32:
        x = x + 50  # a large common mean: the statistics must still be computed in float32
    if eps_mode == "torch":  # (fairseq's sqrt(var) has no derivative at var = 0: the reference is NaN)
        x.view(-1, shape[-1])[1] = 0.75  # a constant row: zero variance, y = 0, finite gradient
    g = rows(*shape, seed=2, offset=False)
    check_against_reference(variant, x.to(DEVICE, dtype), g.to(DEVICE, dtype), eps_mode, TOLERANCE[dtype])
    assert triton_calls == {"forward": 1, "input_grad": 1}


@pytest.mark.parametrize("value", [0.1, 3.7, 1000.3])
def test_a_constant_row_in_fairseq_mode_is_zero(value, triton_calls):
    """The exact output of a constant row is 0, its input gradient (g - mean g) / eps; the mean's float32
    rounding error, left in x - mean, made fairseq's y = d / (|d| + eps) of order 1."""
    from hf_adanorm import LayerNormSimple
    x = torch.full((2, 768), value, device=DEVICE, requires_grad=True)
    g = rows(2, 768, seed=9, offset=False).float().to(DEVICE)
    z = LayerNormSimple(768, eps_mode="fairseq")(x)
    z.backward(g)
    assert z.abs().max() < 1e-6 and triton_calls == {"forward": 1, "input_grad": 1}
    exact = (g - g.mean(-1, keepdim=True)) / 1e-5
    assert ((x.grad - exact).abs().max() / exact.abs().max()) < 1e-5


@pytest.mark.parametrize("hidden", [1, 2, 4096])
def test_edge_sizes(hidden, triton_calls):
    adanorm = next(v for v in VARIANTS if v.id == "adanorm_k0.4_C2")
    x, g = rows(3, hidden, seed=3), rows(3, hidden, seed=4)
    check_against_reference(adanorm, x.to(DEVICE, torch.float32), g.to(DEVICE, torch.float32), "torch", 1e-5)
    assert triton_calls == {"forward": 1, "input_grad": 1}


def test_strided_and_empty_inputs(triton_calls):
    # rows that are a slice of wider ones (row stride 48, passed as is), a transposed view
    # (last-dim stride != 1, copied), and zero rows (no launch, empty results)
    adanorm = next(v for v in VARIANTS if v.id == "adanorm")
    wide = rows(6, 48, seed=5).float().to(DEVICE)
    check_against_reference(adanorm, wide[:, :40], rows(6, 40, seed=6).float().to(DEVICE), "torch", 1e-5)
    tall = rows(40, 6, seed=7).float().to(DEVICE)
    check_against_reference(adanorm, tall.t(), rows(6, 40, seed=8).float().to(DEVICE), "fairseq", 1e-5)
    z, mean, rstd = triton_norm.forward(torch.empty(0, 16, device=DEVICE), 1e-5, True, False, 0.1, 1.0)
    assert z.shape == (0, 16) and mean.shape == rstd.shape == (0, 1)
    assert triton_calls["forward"] == 3  # two through the module, one direct


def test_patched_model_equals_the_eager_kernels(triton_calls, monkeypatch):
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=50, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).to(DEVICE)
    patch_model(model, "adanorm")
    ids = torch.randint(0, 50, (2, 7), device=DEVICE)

    def run():
        model.zero_grad()
        out = model(input_ids=ids).last_hidden_state
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(functional, "first_call_seconds", {})
    out, grads = run()
    first_calls = {key[0] for key in functional.first_call_seconds}
    assert first_calls == {"triton_forward", "triton_input_grad"}  # the compile cost is reported
    assert len(grads) > 20 and "embeddings.word_embeddings.weight" in grads
    assert triton_calls == {"forward": 5, "input_grad": 5}  # 5 norms: embeddings + 2 per layer
    monkeypatch.setattr(functional, "TRITON", "off")
    eager_out, eager_grads = run()
    assert triton_calls == {"forward": 5, "input_grad": 5}
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_failing_kernel_call_falls_back_for_that_call_only(triton_calls, monkeypatch):
    kernel = triton_norm.forward

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(triton_norm, "forward", broken)
    adanorm = next(v for v in VARIANTS if v.id == "adanorm")
    x, g = rows(4, 32).float().to(DEVICE), rows(4, 32, seed=1).float().to(DEVICE)
    with pytest.warns(UserWarning, match=rf"Triton forward kernel failed on a torch.float32 tensor of shape \(4, 32\) "
                                         rf"on {DEVICE}.*no kernel image.*HF_ADANORM_TRITON=off"):
        z, dx = grad_of(adanorm.make(32), x, g)
    assert triton_calls["input_grad"] == 1  # that call's backward still ran the kernel
    assert functional._failures["triton"] is None  # nothing is switched off for later calls
    z_ref, dx_ref = grad_of(lambda t: reference(adanorm, t, 1e-5, "torch"), x.double().cpu(), g.double().cpu())
    torch.testing.assert_close(z.double().cpu(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(triton_norm, "forward", kernel)
    grad_of(adanorm.make(32), x, g)
    assert triton_calls == {"forward": 1, "input_grad": 2}


def test_when_the_kernels_are_not_used(triton_calls, monkeypatch):
    adanorm = next(v for v in VARIANTS if v.id == "adanorm").make(8)
    monkeypatch.setattr(functional, "TRITON", "off")
    grad_of(adanorm, rows(2, 8).float().to(DEVICE), rows(2, 8).float().to(DEVICE))
    monkeypatch.setattr(functional, "TRITON", "auto")  # auto: CUDA tensors only
    grad_of(adanorm, rows(2, 8).float(), rows(2, 8).float())
    monkeypatch.setattr(functional, "TRITON", "always")
    monkeypatch.setattr(triton_norm, "MAX_ROW", 4)  # rows too long for one program's registers
    grad_of(adanorm, rows(2, 8).float().to(DEVICE), rows(2, 8).float().to(DEVICE))
    grad_of(adanorm, rows(2, 8).double().to(DEVICE), rows(2, 8).double().to(DEVICE))  # float64
    assert triton_calls == {"forward": 0, "input_grad": 0}


def test_inside_torch_compile_the_kernels_run(triton_calls, monkeypatch):
    # torch.compile(model, fullgraph=True) sees the norm as one custom op (no graph break)
    # and the compiled code launches the Triton kernels in both directions. ("kernels": these
    # tensors are on the CPU here, where "auto" would trace the math instead.)
    from hf_adanorm import functional
    monkeypatch.setattr(functional, "COMPILED_NORMS", "kernels")
    torch._dynamo.reset()
    adanorm = next(v for v in VARIANTS if v.id == "adanorm")
    module = adanorm.make(24)
    x = rows(6, 24).float().to(DEVICE).requires_grad_(True)
    compiled = torch.compile(lambda t: module(t).square().sum(), fullgraph=True, backend="aot_eager")
    (dx,) = torch.autograd.grad(compiled(x), x)
    assert triton_calls == {"forward": 1, "input_grad": 1}
    (dx_ref,) = torch.autograd.grad(reference(adanorm, x.double(), 1e-5, "torch").square().sum(), x)
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- compiled for real GPUs, on CPU

def compile_ahead_of_time(requests: list[dict]) -> list[dict]:
    """Compile kernel variants for NVIDIA GPUs in a fresh process (see tests/triton_aot.py):
    the interpreter this process runs cannot also drive the real compiler."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_aot.py")), json.dumps(requests)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


FLAGS = list(itertools.product((True, False), repeat=2))


@pytest.mark.slow
def test_every_variant_compiles_for_nvidia_gpus():
    block, warps = triton_norm.launch_settings(4096)
    requests = []
    for arch, dtype in itertools.product((80, 90), ("fp32", "bf16", "fp16")):
        for centre, fairseq in FLAGS:
            requests.append(dict(kernel="forward", arch=arch, dtype=dtype, warps=warps,
                                 constexprs=dict(CENTRE=centre, FAIRSEQ=fairseq, BLOCK=block)))
            requests += [dict(kernel="backward", arch=arch, dtype=dtype, warps=warps,
                              constexprs=dict(CENTRE=centre, FAIRSEQ=fairseq, SUBTRACT_MEAN=subtract_mean,
                                              RESCALE=rescale, BLOCK=block))
                         for subtract_mean, rescale in FLAGS]
    results = compile_ahead_of_time(requests)
    assert len(results) == len(requests) == 2 * 3 * 4 * 5
    for request, result in zip(requests, results):
        assert result["cubin_bytes"] > 0 and result["num_warps"] == warps, (request, result)


@pytest.mark.slow
def test_aligned_rows_are_read_and_written_128_bits_at_a_time():
    # A norm is bound by memory traffic: each thread must move 16 bytes per access, as it
    # does when the rows are aligned (Triton's launcher then marks the pointers and strides).
    block, warps = triton_norm.launch_settings(4096)
    requests = [dict(kernel=kernel, arch=90, dtype=dtype, warps=warps, aligned=True,
                     constexprs=dict(CENTRE=True, FAIRSEQ=False, BLOCK=block, **extra))
                for dtype in ("fp32", "bf16")
                for kernel, extra in (("forward", {}), ("backward", dict(SUBTRACT_MEAN=True, RESCALE=True)))]
    for request, result in zip(requests, compile_ahead_of_time(requests), strict=True):
        accesses = result["global_accesses"]
        vectors = [line for line in accesses if ".v4.b32" in line]
        scalars = [line for line in accesses if ".v" not in line]
        assert vectors, f"no 128-bit accesses in the PTX of {request}:\n" + "\n".join(accesses)
        # only the two float32 row statistics (mean, 1/sigma) move as single values
        assert len(scalars) <= 2 and len(vectors) + len(scalars) == len(accesses), "\n".join(accesses)


def test_launch_settings_cover_the_row():
    for d in (1, 2, 37, 768, 1023, 4096, 16384, triton_norm.MAX_ROW):
        block, warps = triton_norm.launch_settings(d)
        assert block >= d and block & (block - 1) == 0 and 1 <= warps <= 32
        assert block // (32 * warps) <= 64, "too many elements per thread: registers would spill"


@pytest.mark.slow
def test_gpu_benchmark_times_and_checks_every_path(tmp_path, monkeypatch):
    # benchmarks/bench_gpu.py end to end on a tiny shape (on CPU: the kernels in the interpreter)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_gpu")
    rows = bench.main(["--device", DEVICE, "--shapes", "16x48", "--dtypes", "fp32", "--out", str(tmp_path)])
    paths = {(r["norm"], r["path"]) for r in rows if "refused" not in r}
    assert len(paths) == len(rows) == 2 + 2 * len(bench.HF_KINDS)
    assert ("adanorm", "triton") in paths and ("adanorm", "eager") in paths
    ln = next(r for r in rows if r["norm"] == "nn.LayerNorm")
    assert ln["full_vs_ln"] == 1.0 and all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    assert (tmp_path / "gpu_norms.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "gpu_norms.png").stat().st_size > 10_000


def test_gpu_benchmark_refuses_a_kernel_that_differs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = pytest.importorskip("bench_gpu")
    real_forward = triton_norm.forward

    def off_by_a_bit(x2d, eps, centre, fairseq, k, C):
        z, mean, rstd = real_forward(x2d, eps, centre, fairseq, k, C)
        return z * 1.01, mean, rstd
    monkeypatch.setattr(triton_norm, "forward", off_by_a_bit)
    rows = bench.main(["--device", DEVICE, "--shapes", "16x48", "--dtypes", "fp32", "--out", str(tmp_path)])
    refused = {(r["norm"], r["path"]) for r in rows if "refused" in r}
    assert refused == {(name, "triton") for name in bench.HF_KINDS}

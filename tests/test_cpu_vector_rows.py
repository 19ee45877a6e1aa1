"""The vectorized row kernels of hf_adanorm/csrc (at::vec float lanes, steps of two vectors,
Kahan-combined blocks) against the float64 reference of test_norms.py.

Each vector ISA walks a row in steps of 16 (AVX2) or 32 (AVX-512) elements and sums it in blocks
of 64 steps, so the row lengths here sit on both sides of those sizes (a masked last step, a
last block of one step). Also: outputs larger than glibc's mmap threshold (fresh pages), rows split over
several threads (the next-row prefetch stops at a thread's last row), long rows far from zero
against torch's own error, and every ISA build torch can dispatch to on this CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_adanorm import cpu_kernels, functional
from test_norms import EPS_MODES, VARIANTS, check_against_reference, rows

NORMS = [v for v in VARIANTS if not v.identity]
LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 2047, 2049, 4095 + 64]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("variant", NORMS, ids=[v.id for v in NORMS])
@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "bf16", "fp16"])
def test_row_lengths_around_the_vector_step(variant, eps_mode, dtype, cpu_kernels_mode):
    calls = cpu_kernels_mode("auto")
    lengths = [d for d in LENGTHS if not (d == 1 and eps_mode == "fairseq" and variant.centre)]  # 0/0 variance
    for d in lengths:
        x = rows(3, d, dtype=dtype, seed=d)
        check_against_reference(variant, x, eps_mode, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert calls == {"forward": len(lengths), "input_grad": len(lengths)}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2048, 4096)), (torch.bfloat16, (4096 + 3, 4096))],
                         ids=["fp32-32MiB", "bf16-32MiB"])
@pytest.mark.slow
def test_large_outputs_split_over_threads(dtype, shape, threads, cpu_kernels_mode):
    """32 MiB outputs (fresh pages from mmap), rows split over threads: the prefetch of each
    thread's next row stops at its last, and every row is normalized once."""
    calls = cpu_kernels_mode("auto")
    variant = next(v for v in NORMS if v.id == "adanorm")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(variant, rows(*shape, dtype=dtype, seed=threads), "torch",
                                rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    finally:
        torch.set_num_threads(before)
    assert calls == {"forward": 1, "input_grad": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_offset_rows_are_as_accurate_as_torch_both_ways(dtype, cpu_kernels_mode):
    """D = 65536 + 17 (many blocks and a masked step), offset 1e3: output and input gradient no
    further from float64 than torch's own LayerNorm in the same dtype."""
    cpu_kernels_mode("auto")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 65553, generator=gen) + 1e3).to(dtype)
    g = torch.randn(3, 65553, generator=gen).to(dtype)

    def output_and_grad(fn, t):
        t = t.detach().clone().requires_grad_(True)
        z = fn(t)
        (dt,) = torch.autograd.grad(z, t, g.to(t.dtype))
        return z.double(), dt.double()

    want = output_and_grad(lambda t: F.layer_norm(t, (65553,)), x.double())
    theirs = output_and_grad(lambda t: F.layer_norm(t, (65553,)), x)
    ours = output_and_grad(functional.normalize, x)
    for got, ref, want_ in zip(ours, theirs, want):
        ours_error, torch_error = (got - want_).abs().max().item(), (ref - want_).abs().max().item()
        assert ours_error <= max(2 * torch_error, 1e-5 * want_.abs().max().item()), (ours_error, torch_error)


@pytest.mark.parametrize("d", [64, 95], ids=["whole-steps", "masked-tail"])
def test_bfloat16_outputs_keep_denormals_and_nans(d, cpu_kernels_mode):
    """The AVX512-BF16 conversion reads float32 denormals as 0 and writes NaNs with other bits,
    so the kernels hand such steps to torch's own rounding: a tiny output scale C (forward) or a
    tiny upstream gradient (backward) must come out as bfloat16 denormals, not zeros, and a NaN
    row as NaNs."""
    calls = cpu_kernels_mode("auto")
    tiny = 1e-39  # float32 and bfloat16 denormals start below 1.18e-38
    x = rows(4, d, dtype=torch.bfloat16, seed=d)
    x[3, 5] = float("nan")
    g = (rows(4, d, seed=d + 1, offset=False) * tiny).to(torch.bfloat16)
    assert (g[:3] != 0).float().mean() > 0.9
    kwargs = dict(k=0.1, C=tiny)
    t = x.clone().requires_grad_(True)
    z = functional.normalize(t, **kwargs)
    (dx,) = torch.autograd.grad(z, t, g)
    t64 = x.double().requires_grad_(True)
    z64 = functional.normalize(t64, **kwargs)  # float64: no kernel, no denormals
    (dx64,) = torch.autograd.grad(z64, t64, g.double())
    assert calls == {"forward": 1, "input_grad": 1}
    spacing = 2.0 ** -133  # of bfloat16 denormals
    for got, want in ((z, z64 * 1.0), (dx, dx64)):
        got, want = got[:3].double(), want[:3].detach()
        assert want.abs().max() < 2 ** -126  # the whole tensor is denormal
        assert ((got - want).abs() <= 1.01 * spacing).all(), (got - want).abs().max()
        assert (got[want.abs() > 2 * spacing] != 0).all()  # not flushed to zero
    assert torch.isnan(z[3]).all() and torch.isnan(dx[3]).all()


# Builds the kernels for one CPU capability in a fresh process (ATEN_CPU_CAPABILITY lowers what
# torch dispatches to) and prints the build's name and the largest error against float64 over
# row lengths around each vector step, for the forward and the input gradient.
ISA_PROBE = """
import os, torch
from hf_adanorm import AdaNorm, DetachNorm, RMSAdaNorm, cpu_kernels
if os.environ.get("PROBE_WITHOUT_AVX512_BF16"):  # the AVX512 build of a CPU without AVX512-BF16
    capabilities = {**torch.cpu.get_capabilities(), "avx512_bf16": False}
    torch.cpu.get_capabilities = lambda: capabilities
print(torch.backends.cpu.get_cpu_capability(), cpu_kernels.build_flags()[0])
ran = []
kernel = cpu_kernels.forward
cpu_kernels.forward = lambda *args: (kernel(*args), ran.append(1))[0]  # counts the kernel's calls
worst = 0.0
for d in (1, 5, 8, 9, 16, 17, 33, 100, 2049):
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(d)
        x = (torch.randn(4, d, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
        g = torch.randn(4, d, generator=gen, dtype=torch.float64).to(dtype)
        for module, centre, detach in ((AdaNorm(d), True, False), (DetachNorm(d, detach="both"), True, True),
                                       (RMSAdaNorm(d, k=0.2, C=1.5), False, False)):
            k, C = (0.2, 1.5) if not centre else ((0.1, 1.0) if not detach else (0.0, 1.0))
            def reference(t):
                mu = t.mean(-1, keepdim=True) if centre else 0.0
                s = ((t - mu).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
                if detach:
                    mu, s = (mu.detach() if centre else mu), s.detach()
                y = (t - mu) / s
                return (C * (1 - k * y)).detach() * y
            outs = []
            for fn, t in ((module, x), (reference, x.double())):
                t = t.detach().clone().requires_grad_(True)
                z = fn(t)
                (dt,) = torch.autograd.grad(z, t, g.to(t.dtype))
                outs.append((z.double(), dt.double()))
            for got, want in zip(*outs):
                # relative to the tensor's size (at least 1: a row of one element has z = dx = 0), in
                # units of each dtype's tolerance
                error = ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
                worst = max(worst, error if dtype == torch.float32 else error / 1e3)
print(worst, len(ran))
"""


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_vector_isa_build_matches_reference(capability, cpu_kernels_mode):
    """The portable build (plain arrays), the AVX2 build (8 lanes) and the AVX512 build without
    AVX512-BF16 beside this machine's own: each is a separate library, built once per machine
    into the usual cache."""
    cpu_kernels_mode("auto")  # a compiler is there (or the test is skipped)
    # torch takes ATEN_CPU_CAPABILITY at its word, even above what the CPU has (then SIGILL): ask the CPU
    supported = {"default": True, "avx2": torch.cpu._is_avx2_supported(), "avx512": torch.cpu._is_avx512_supported()}
    if not supported[capability]:
        pytest.skip(f"this CPU cannot run {capability}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PROBE_WITHOUT_AVX512_BF16": "1"}
    out = subprocess.run([sys.executable, "-c", ISA_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (seen, name), (worst, calls) = (line.split() for line in out.stdout.splitlines()[:2])
    if seen.lower() != capability:
        pytest.skip(f"this CPU cannot run {capability} (torch dispatches to {seen})")
    assert name == ("hf_adanorm_cpu" if capability == "default" else f"hf_adanorm_cpu_{capability}")
    assert int(calls) == 9 * 2 * 3  # every row length, dtype and norm ran the kernels
    assert float(worst) < 2e-5, worst  # float32 within 2e-5 of the largest value, bfloat16 within 2e-2

"""Outputs of 32 MiB and more from the C++ CPU kernels: the pool of freed outputs they reuse
(hf_adanorm/csrc/output_pool.h), and the non-temporal stores that write them (float_lanes.h).

A block handed out again must be fully overwritten (values are checked against the eager kernels after
the block was filled with NaN), the limit must hold, the profiler must still see every output as an
allocation, and streamed rows, aligned or not, must match the float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_adanorm import AdaNorm, DetachNorm, cpu_kernels, functional
from test_fast_paths import KINDS, assert_matches_reference, awkward_input

MIB = 2 ** 20
ROWS, D = 8192, 1024  # float32: exactly 32 MiB, the smallest pooled size


@pytest.fixture
def pool(cpu_kernels_mode):
    """The kernels on, an empty pool with the default limit; restored afterwards."""
    cpu_kernels_mode("auto")
    limit = cpu_kernels.cache_info()["limit_bytes"]
    cpu_kernels.empty_cache()
    yield
    cpu_kernels.set_cache_limit(limit)
    cpu_kernels.empty_cache()


def eager(module, x, g):
    """The module's output and input gradient from torch's kernels (the kernels switched off)."""
    before = functional.CPU_KERNELS
    functional.CPU_KERNELS = "off"
    try:
        x = x.detach().requires_grad_()
        z = module(x)
        z.backward(g)
        return z.detach(), x.grad
    finally:
        functional.CPU_KERNELS = before


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, D, generator=gen) * 3 + 1, torch.randn(ROWS, D, generator=gen)


@pytest.mark.parametrize("module", [AdaNorm(D), DetachNorm(D, detach="both")], ids=["adanorm", "detachnorm"])
def test_a_reused_block_is_fully_overwritten(pool, module):
    x, g = data()
    z = module(x.requires_grad_())
    z.backward(g)
    z_ptr, dx_ptr = z.data_ptr(), x.grad.data_ptr()
    z.detach().fill_(float("nan"))
    x.grad.fill_(float("nan"))
    del z
    x.grad = None
    assert cpu_kernels.cache_info()["cached_bytes"] == 2 * ROWS * D * 4

    x2, g2 = data(1)
    z2 = module(x2.requires_grad_())
    z2.backward(g2)
    assert {z2.data_ptr(), x2.grad.data_ptr()} == {z_ptr, dx_ptr}  # both blocks served again
    assert cpu_kernels.cache_info()["cached_bytes"] == 0
    want_z, want_dx = eager(module, x2, g2)
    torch.testing.assert_close(z2.detach(), want_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, want_dx, rtol=1e-4, atol=1e-5)


def test_small_outputs_are_left_to_torch(pool):
    x = torch.randn(ROWS // 2, D)
    z = AdaNorm(D)(x)
    del z
    assert cpu_kernels.cache_info()["cached_bytes"] == 0


def test_the_limit_holds_and_evicts_the_oldest(pool):
    x = torch.randn(ROWS, D)
    cpu_kernels.set_cache_limit(2 * ROWS * D * 4)
    outs = [AdaNorm(D)(x) for _ in range(3)]
    pointers = [z.data_ptr() for z in outs]
    while outs:  # freed in order: the first one is the oldest, and goes
        outs.pop(0)
    assert cpu_kernels.cache_info()["cached_bytes"] == 2 * ROWS * D * 4
    z = AdaNorm(D)(x)
    assert z.data_ptr() == pointers[2]  # the most recently freed block comes first
    cpu_kernels.set_cache_limit(ROWS * D * 4 - 1)  # lowering the limit frees what no longer fits
    assert cpu_kernels.cache_info()["cached_bytes"] == 0
    del z  # and a block over the limit is freed, not kept
    assert cpu_kernels.cache_info()["cached_bytes"] == 0


def test_a_block_is_reused_only_for_a_close_size(pool):
    z = AdaNorm(D)(torch.randn(2 * ROWS, D))
    pointer = z.data_ptr()
    del z
    small = AdaNorm(D)(torch.randn(ROWS, D))  # half the size: would waste half the block
    assert small.data_ptr() != pointer and cpu_kernels.cache_info()["cached_bytes"] == 2 * ROWS * D * 4
    close = AdaNorm(D)(torch.randn(2 * ROWS - 64, D))  # within a quarter: served from it
    assert close.data_ptr() == pointer


def test_empty_cache_and_a_limit_of_zero(pool):
    del pool
    z = AdaNorm(D)(torch.randn(ROWS, D))
    del z
    assert cpu_kernels.cache_info()["cached_bytes"] == ROWS * D * 4
    cpu_kernels.empty_cache()
    assert cpu_kernels.cache_info()["cached_bytes"] == 0
    cpu_kernels.set_cache_limit(0)
    z = AdaNorm(D)(torch.randn(ROWS, D))
    del z
    assert cpu_kernels.cache_info() == {"cached_bytes": 0, "limit_bytes": 0}


def test_a_pooled_output_behaves_like_any_tensor(pool):
    x = torch.randn(ROWS, D)
    z = AdaNorm(D)(x).detach()
    head = z[:2].clone()
    z.resize_(ROWS + 16, D)  # grows through the pool's allocator, keeping the values
    torch.testing.assert_close(z[:2], head)
    shared = z.clone().share_memory_()
    torch.testing.assert_close(shared[:2], head)
    assert torch.equal(torch.load(_saved(z), weights_only=True)[:2], head)


def _saved(t):
    import io
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    return buffer


def test_the_profiler_sees_each_output_allocated(pool):
    """benchmarks/bench_norms.py counts allocated bytes from the profiler's events: a block served
    from the pool must count as before."""
    x = torch.randn(ROWS, D)
    AdaNorm(D)(x)  # freed at once: leaves a block in the pool
    assert cpu_kernels.cache_info()["cached_bytes"] == ROWS * D * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        z = AdaNorm(D)(x)
        del z
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    freed = -sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage < 0)
    assert allocated >= ROWS * D * 4 and freed >= ROWS * D * 4


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_a_bad_limit_is_refused(pool, value):
    with pytest.raises(ValueError, match="limit_bytes must be an integer >= 0"):
        cpu_kernels.set_cache_limit(value)


@pytest.mark.slow
@pytest.mark.parametrize("value,limit", [("0", 0), ("64", 64 * MIB), ("", 2 ** 30), ("lots", None), ("-1", None), ("nan", None)])
def test_the_limit_from_the_environment(value, limit):
    # the limit before the kernels load (they are not built for that), and the library's once loaded
    code = ("import torch; from hf_adanorm import AdaNorm, cpu_kernels; before = cpu_kernels.cache_info(); "
            "AdaNorm(8)(torch.randn(2, 8)); print(before['limit_bytes'], cpu_kernels.cache_info()['limit_bytes'])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, cpu_kernels.CACHE_LIMIT_ENV: value},
                         capture_output=True, text=True, timeout=120)
    if limit is None:
        assert out.returncode != 0 and f"{cpu_kernels.CACHE_LIMIT_ENV}={value!r}" in out.stderr
    else:
        assert out.returncode == 0 and out.stdout.split() == [str(limit)] * 2, out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_the_pool(pool):
    """DataLoader workers are forks: a child frees and allocates pooled outputs like the parent."""
    x = torch.randn(ROWS, D)
    inherited = AdaNorm(D)(x)
    AdaNorm(D)(x)  # one block cached in the parent
    pid = os.fork()
    if pid == 0:  # the child: free an inherited output, take two blocks, check one
        code = 1
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP's team does not survive a fork
            del inherited
            outs = [AdaNorm(D)(x) for _ in range(2)]
            code = 0 if torch.allclose(outs[1], outs[0]) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


LARGE = [(torch.float32, 1024, 1e-5), (torch.bfloat16, 1023, 2e-2), (torch.float16, 4096, 5e-3)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", [KINDS[1], KINDS[5], KINDS[7]], ids=lambda k: k.id)
@pytest.mark.parametrize("dtype,d,tol", LARGE, ids=["fp32-aligned", "bf16-unaligned-rows", "fp16"])
def test_large_outputs_match_the_reference(pool, kind, dtype, d, tol):
    """Rows of 1023 bf16 elements start at every alignment: streamed and plain steps mix in a row."""
    rows = -(-64 * MIB // (d * dtype.itemsize))  # the smallest output that is streamed
    x, g = awkward_input((rows, d), dtype)
    assert_matches_reference(kind, kind.make(d), x, g, tol)


@pytest.mark.slow
def test_the_pool_answers_without_building_the_kernels(tmp_path):
    """cache_info, set_cache_limit and empty_cache work where the kernels cannot be built (no compiler),
    and build nothing."""
    code = ("from hf_adanorm import cpu_kernels; cpu_kernels.set_cache_limit(5); cpu_kernels.empty_cache(); "
            "print(cpu_kernels.cache_info(), cpu_kernels.ops.cache_info().currsize)")
    env = {**os.environ, "CXX": "no-such-compiler", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'cached_bytes': 0, 'limit_bytes': 5} 0" and not any(tmp_path.iterdir())


OUT_OF_MEMORY = """
import re, resource, torch
from hf_adanorm import AdaNorm, cpu_kernels
MIB = 2 ** 20
x100, x200 = torch.randn(25 * 1024, 1024), torch.randn(50 * 1024, 1024)  # 100 and 200 MiB
AdaNorm(1024)(x100[:8])  # loads the kernels
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 420 * MIB, resource.RLIM_INFINITY))
outs = [AdaNorm(1024)(x100) for _ in range(3)]
del outs
print(cpu_kernels.cache_info()["cached_bytes"] // MIB)
z = AdaNorm(1024)(x200)  # 300 MiB cached + 200 MiB new > 420 MiB: the pool must give its blocks back
print(cpu_kernels.cache_info()["cached_bytes"] // MIB, bool(torch.isfinite(z[:64]).all()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_an_allocation_that_fails_empties_the_pool_and_tries_again(cpu_kernels_mode):
    cpu_kernels_mode("auto")
    out = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hf_adanorm: the C++ CPU" not in out.stderr  # served by the kernel, not by the fallback
    assert out.stdout.split() == ["300", "0", "True"]

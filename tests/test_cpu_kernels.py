"""How the C++ CPU kernels are built, cached, chosen and given up on (hf_adanorm.cpu_kernels).

Their numerics are checked against the reference in test_fast_paths.py and test_norms.py;
here: the fallback when a build or a call fails, the cache that serves without a compiler, a lock left
by a killed build, accuracy on long offset rows, the tensors they leave to the eager path,
and the switch's validation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from hf_adanorm import AdaNorm, DetachNorm, cpu_kernels, functional
from test_fast_paths import KINDS, assert_matches_reference, awkward_input

# One AdaNorm forward and backward in a fresh process; prints the warnings, the recorded
# failure, whether the kernels ran, and whether the output equals the formula.
PROBE = """
import warnings, torch
from hf_adanorm import AdaNorm, cpu_kernels, functional
ran = []
kernel = cpu_kernels.forward
cpu_kernels.forward = lambda *args: (kernel(*args), ran.append(1))[0]  # counts successes
x = torch.randn(8, 32, dtype=torch.float64).float().requires_grad_()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    z = AdaNorm(32)(x)
    z.sum().backward()
y = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, correction=0) + 1e-5).sqrt()
print([str(w.message) for w in caught])
print(functional._failures['cpu'])
print(bool(ran))
print(torch.allclose(z, (1 - 0.1 * y) * y, atol=1e-6))
"""


def run_probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    warned, failure, ran, close = out.stdout.strip().splitlines()
    return warned, failure, ran == "True", close == "True"


def test_failed_build_falls_back_to_eager_once(cpu_kernels_mode, monkeypatch):
    calls = cpu_kernels_mode("auto", needs_kernels=False)
    builds = []

    def broken_build():
        builds.append(1)
        raise cpu_kernels.BuildError("building hf_adanorm_cpu failed: /bin/sh: 1: c++: not found")

    monkeypatch.setattr(cpu_kernels, "ops", broken_build)
    x, g = awkward_input((16, 48), torch.float32)
    unavailable = r"C\+\+ CPU kernels are unavailable .*c\+\+: not found.*HF_ADANORM_CPU_KERNELS=off"
    with pytest.warns(UserWarning, match=unavailable):
        assert_matches_reference(KINDS[1], AdaNorm(48), x, g, 1e-5)
    assert "not found" in functional._failures["cpu"]
    assert_matches_reference(KINDS[3], DetachNorm(48, detach="mean"), x, g, 1e-5)
    assert builds == [1] and calls == {"forward": 1, "input_grad": 0}  # never retried


def test_a_failing_kernel_call_falls_back_for_that_call_only(cpu_kernels_mode, monkeypatch):
    """A kernel call that raises (out of memory, one odd shape) warns with the shape, dtype and
    device, that call is served by torch's kernels, and the next call runs the kernel again."""
    calls = cpu_kernels_mode("auto")
    kernel, failures = cpu_kernels.forward, []

    def fails_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 123 bytes")
        return kernel(*args)

    monkeypatch.setattr(cpu_kernels, "forward", fails_once)
    x, g = awkward_input((3, 16, 48), torch.float32)
    failed_before = functional.failed_calls["cpu"]
    with pytest.warns(UserWarning, match=r"C\+\+ CPU forward kernel failed on a torch.float32 tensor of shape "
                                         r"\(48, 48\) on cpu \(RuntimeError: DefaultCPUAllocator: not enough memory"):
        assert_matches_reference(KINDS[1], AdaNorm(48), x, g, 1e-5)
    assert functional.failed_calls["cpu"] == failed_before + 1 and functional._failures["cpu"] is None
    assert calls["input_grad"] == 1  # the backward of that very call still ran the kernel
    assert_matches_reference(KINDS[1], AdaNorm(48), x, g, 1e-5)
    assert failures == [1] and functional.failed_calls["cpu"] == failed_before + 1
    assert calls == {"forward": 1, "input_grad": 2}  # the counter sits outside the failing wrapper


@pytest.mark.slow
def test_without_a_compiler_the_eager_kernels_still_run(tmp_path):
    """A fresh process, no compiler and no cached build: one warning that says so, right results."""
    warned, failure, ran, close = run_probe(CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert "C++ CPU kernels are unavailable (BuildError: no C++ compiler ('/nonexistent/c++' is not on PATH" in warned
    assert warned.count("unavailable") == 1 and "HF_ADANORM_CPU_KERNELS=off" in warned
    assert failure.startswith("BuildError: no C++ compiler") and not ran and close


@pytest.mark.slow
def test_a_cached_build_loads_without_a_compiler(cpu_kernels_mode, tmp_path):
    """A finished build serves later processes without the build tools (a container image) or
    a writable folder (the lock file is not needed)."""
    cpu_kernels_mode("auto")  # builds into the session's cache if it is not there yet
    name, cflags, ldflags = cpu_kernels.build_flags()
    folder = cpu_kernels.build_directory(name, cflags + ldflags)
    assert (folder / f"{name}.so").exists()
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    env = {"CXX": "/nonexistent/c++", "PATH": os.path.dirname(sys.executable)}
    warned, failure, ran, close = run_probe(**env, **({"TORCH_EXTENSIONS_DIR": root} if root else {}))
    assert warned == "[]" and failure == "None" and ran and close
    assert not (folder / "lock").exists()


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.touch()
    start = time.time()
    os.utime(lock, (start - 2 * cpu_kernels.STALE_LOCK_SECONDS,) * 2)
    cpu_kernels._wait_for_other_builds(tmp_path)
    assert not lock.exists() and time.time() - start < 5


def test_a_live_build_is_waited_for(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.touch()
    naps = []

    def nap(seconds):  # the other build finishes while we wait
        naps.append(seconds)
        lock.unlink()

    monkeypatch.setattr(time, "sleep", nap)
    cpu_kernels._wait_for_other_builds(tmp_path)
    assert naps == [0.5]


def test_the_build_folder_changes_with_source_flags_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels.build_directory("hf_adanorm_cpu", ["-O3"])
    assert folder.parent == tmp_path and torch.__version__ in folder.name
    assert cpu_kernels.build_directory("hf_adanorm_cpu", ["-O2"]) != folder
    source = tmp_path / "norm_cpu.cpp"
    source.write_text(cpu_kernels.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    assert cpu_kernels.build_directory("hf_adanorm_cpu", ["-O3"]) != folder


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_long_rows_far_from_zero_are_as_accurate_as_torch(offset, cpu_kernels_mode):
    """Row sums are blocked and shifted: no error growth with the row length or a common offset."""
    cpu_kernels_mode("auto")
    x = torch.randn(4, 65536, generator=torch.Generator().manual_seed(0)) + offset
    want = F.layer_norm(x.double(), (65536,))
    torch_error = (F.layer_norm(x, (65536,)).double() - want).abs().max().item()
    ours = (functional.normalize(x).double() - want).abs().max().item()
    assert ours <= max(2 * torch_error, 1e-5), (ours, torch_error)


@pytest.mark.parametrize("lead", [0.9, 1e4], ids=["near", "outlier"])
def test_a_row_whose_first_values_are_far_from_its_mean_is_as_accurate_as_torch(lead, cpu_kernels_mode):
    """The forward sums x - p and (x - p)^2 in one pass, p the mean of the row's first step, where
    |mean - p| <= sigma; a row that starts far out (an outlier first) takes a second, exact pass."""
    cpu_kernels_mode("auto")
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)) + 1e3
    x[:, :32] += lead * (x.std() if lead < 1 else 1)
    want = F.layer_norm(x.double(), (4096,))
    torch_error = (F.layer_norm(x, (4096,)).double() - want).abs().max().item()
    ours = (functional.normalize(x).double() - want).abs().max().item()
    assert ours <= max(2 * torch_error, 1e-5), (ours, torch_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_rows_near_the_float_limit_normalize_to_zero(dtype, cpu_kernels_mode):
    """The pivot of the one-pass sums is a mean of the first values: summed in float it overflowed."""
    cpu_kernels_mode("auto")
    x = torch.full((2, 4096), 2e37, dtype=dtype, requires_grad=True)
    z = AdaNorm(4096)(x)
    z.float().sum().backward()
    assert torch.equal(z.float(), torch.zeros(2, 4096)) and torch.isfinite(x.grad.float()).all()


def test_tensor_subclasses_take_the_eager_path(cpu_kernels_mode):
    """Subclasses bring their own dispatch (FakeTensor, DTensor ...): eager for them, and the
    kernels stay on for plain tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Tagged(torch.Tensor):
        pass

    calls = cpu_kernels_mode("auto")
    x, g = awkward_input((6, 48), torch.float32)
    assert_matches_reference(KINDS[1], lambda t: AdaNorm(48)(t.as_subclass(Tagged)), x, g, 1e-5)
    with FakeTensorMode():
        fake = torch.empty(6, 5, 48, dtype=torch.bfloat16, requires_grad=True)
        z = AdaNorm(48)(fake)
        (dx,) = torch.autograd.grad(z.float().sum(), fake)
    assert z.shape == dx.shape == (6, 5, 48) and z.dtype == dx.dtype == torch.bfloat16
    assert calls == {"forward": 0, "input_grad": 0} and functional._failures["cpu"] is None
    assert_matches_reference(KINDS[1], AdaNorm(48), x, g, 1e-5)
    assert calls == {"forward": 1, "input_grad": 1}


@pytest.mark.slow
@pytest.mark.parametrize("variable,value", [("HF_ADANORM_CPU_KERNELS", "0"), ("HF_ADANORM_TRITON", "on")])
def test_a_misspelt_switch_is_an_error(variable, value):
    out = subprocess.run([sys.executable, "-c", "import hf_adanorm"], env={**os.environ, variable: value},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"${variable} must be one of" in out.stderr and repr(value) in out.stderr

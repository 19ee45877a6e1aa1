"""Hand-written C++ kernels for CPU tensors: the math of :mod:`hf_adanorm.functional`, one pass per row.

The source, ``csrc/norm_cpu.cpp``, is built on a machine's first use with
:func:`torch.utils.cpp_extension.load` (about 10 s on two cores; needs a C++ compiler and
``ninja``) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one folder
per source, flags and torch version; later processes load the library from there (~0.1 s).  The kernels register
``torch.ops.hf_adanorm_cpu.forward`` and ``torch.ops.hf_adanorm_cpu.input_grad``.

Each row is read from memory once and kept in cache across its passes (L1 for rows of a few
thousand elements): the forward writes
``z = C (1 - k y) y`` with the row's mean and ``1/sigma``; the backward writes
``dL/dx = (1/sigma) (g' - a mean(g') - b y mean(g' y))`` with ``g' = C (1 - k y) g``
(``a``, ``b`` as in :mod:`hf_adanorm.functional`).  Arithmetic is float32 for float32,
bfloat16 and float16 inputs; outputs take the input dtype.  Outputs of 32 MiB and more come from a capped pool of freed
outputs (:func:`cache_info`), and those of 64 MiB and more are written with non-temporal stores, so
that they run at the machine's copy bandwidth (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BACKEND = "cpu"
SOURCE = Path(__file__).with_name("csrc") / "norm_cpu.cpp"
HEADERS = [Path(__file__).with_name("csrc") / name for name in ("float_lanes.h", "output_pool.h")]  # included by SOURCE
CACHE_LIMIT_ENV = "HF_ADANORM_CPU_CACHE_MB"  # the pool of freed outputs: its limit in MiB (0: off)


class BuildError(RuntimeError):
    """The kernels cannot be built or loaded on this machine (a kernel call that fails is not one)."""


# torch's own flags for its kernels of each CPU capability (cmake/Codegen.cmake): at::vec's
# Vectorized<float> then has 16 (AVX512) or 8 (AVX2) lanes; without them it is a portable array.
VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def build_flags() -> tuple[str, list[str], list[str]]:
    """``(name, cflags, ldflags)`` for this CPU, platform and torch build.

    The vector ISA is the one torch itself dispatches to on this CPU (a runtime check of the CPU,
    which ``ATEN_CPU_CAPABILITY`` can lower), and is part of the extension's name, so a cache
    shared by machines of different CPUs keeps one build each and never loads one a CPU cannot run.
    """
    if sys.platform == "win32":  # MSVC: no OpenMP here, so rows run on one thread (untested)
        return "hf_adanorm_cpu", ["/O2", "-DCPU_CAPABILITY=DEFAULT"], []
    capability = torch.backends.cpu.get_cpu_capability()
    isa = VECTOR_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    # AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 on): one instruction rounds 32 floats to bfloat16
    if capability == "AVX512" and torch.cpu.get_capabilities().get("avx512_bf16"):
        capability, isa = "AVX512_BF16", [*isa, "-mavx512bf16", "-DHF_ADANORM_AVX512_BF16"]
    # at::parallel_for runs its loop on torch's OpenMP pool only if this file is built with
    # OpenMP too; otherwise (and with Apple's clang, which has no -fopenmp) the rows run on
    # one thread.
    openmp = torch.backends.openmp.is_available() and sys.platform != "darwin"
    name = "hf_adanorm_cpu" + (f"_{capability.lower()}" if capability.startswith(tuple(VECTOR_FLAGS)) else "")
    return name, ["-O3", *isa, "-fopenmp" if openmp else "-fopenmp-simd"], ["-fopenmp"] if openmp else []


def build_directory(name: str, flags: list[str]) -> Path:
    """Where the build is cached: one folder per source text (headers included), flags and torch version (whose
    ABI the library is tied to), so an upgrade of either never loads a stale library."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    sources = b"".join(path.read_bytes() for path in [SOURCE, *HEADERS])
    digest = hashlib.sha256(sources + " ".join(flags).encode()).hexdigest()[:12]
    return Path(root) / f"{name}-torch{torch.__version__}-{digest}"


# torch's build lock is a plain file: a build killed part-way (preemption, OOM) leaves it behind,
# and every later build would wait on it forever. No build takes this long.
STALE_LOCK_SECONDS = 300.0


def _wait_for_other_builds(folder: Path) -> None:
    lock = folder / "lock"
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the other build just finished
            return
        if age > STALE_LOCK_SECONDS:
            logger.warning("hf_adanorm: removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(0.5)


def _why(err: Exception) -> str:
    """The line of a failed build that says what went wrong (torch puts the whole command first)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    causes = ("error:", "not found", "No such file", "Permission denied", "Read-only")
    return next((line for line in lines if not line.startswith("[") and any(c in line for c in causes)),
                lines[-1] if len(lines) > 1 else lines[0])


@functools.cache
def ops():
    """``torch.ops.hf_adanorm_cpu``, loaded from the cache, or built first on this machine's first use,
    with the output pool's limit taken from ``$HF_ADANORM_CPU_CACHE_MB`` if that is set."""
    library = _load()
    library.set_cache_limit(_cache_limit)
    return library


DEFAULT_CACHE_LIMIT = 2 ** 30


def _cache_limit_from_env() -> int:
    value = os.environ.get(CACHE_LIMIT_ENV)
    if value is None or not value.strip():
        return DEFAULT_CACHE_LIMIT
    try:
        mib = float(value)
    except ValueError:
        mib = -1.0
    if not (0 <= mib < 2 ** 40):
        raise ValueError(f"{CACHE_LIMIT_ENV}={value!r}: give the limit of hf_adanorm's CPU output cache in MiB, "
                         "a number >= 0 (0 turns the cache off)")
    return int(mib * 2 ** 20)


# The pool's limit: read on import (so a bad value fails at `import hf_adanorm`), given to the library
# when it loads, and changed by set_cache_limit.
_cache_limit = _cache_limit_from_env()


def _load():
    name, cflags, ldflags = build_flags()
    folder = build_directory(name, cflags + ldflags)
    library = folder / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    # A finished build loads without the build tools or the lock, so caches that are read-only
    # (a container image) or shared between users serve too.
    if library.exists():
        try:
            torch.ops.load_library(str(library))
            return torch.ops.hf_adanorm_cpu
        except OSError as err:  # e.g. a link cut short: build it again below
            logger.warning("hf_adanorm: cannot load %s (%s); building it again", library, err)
    compiler = os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler!r} is not on PATH; install g++ or clang, or set CXX) "
                           "to build hf_adanorm's CPU kernels")
    from torch.utils.cpp_extension import load

    logger.info("hf_adanorm: building the CPU kernels %s in %s (once per machine kind, ~10 s)", name, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _wait_for_other_builds(folder)
        load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
             build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - a compile error, no ninja, an unwritable folder ...
        raise BuildError(f"building {name} in {folder} failed: {_why(err)}") from err
    return torch.ops.hf_adanorm_cpu


def cache_info() -> dict:
    """The pool of freed outputs that the kernels reuse (``csrc/output_pool.h``): bytes held now and the limit.

    Outputs of 32 MiB and more come from it: glibc would map each one anew, and the Linux kernel zeroes
    new memory page by page on the first write, which costs more than the norm itself (BENCHMARKS.md).
    Kernels that were never loaded hold nothing (and are not built to say so).
    """
    if not _loaded():
        return {"cached_bytes": 0, "limit_bytes": _cache_limit}
    cached, limit = ops().cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit}


def set_cache_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of freed outputs (default 1 GiB, or ``$HF_ADANORM_CPU_CACHE_MB``); 0: none."""
    global _cache_limit
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an integer >= 0, got {limit_bytes!r}")
    _cache_limit = limit_bytes
    if _loaded():
        ops().set_cache_limit(limit_bytes)


def empty_cache() -> None:
    """Give every cached output back to the system (like ``torch.cuda.empty_cache``)."""
    if _loaded():
        ops().empty_cache()


def _loaded() -> bool:
    return ops.cache_info().currsize > 0


def forward(x2d: torch.Tensor, eps: float, centre: bool, fairseq: bool, k: float, C: float):
    """``(z, mean, 1/sigma)`` of each row of ``x2d``; ``mean`` and ``1/sigma`` are float32 ``(rows, 1)``."""
    return ops().forward(x2d.contiguous(), eps, centre, fairseq, k, C)


def input_grad(g: torch.Tensor, x2d: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, eps: float,
               centre: bool, fairseq: bool, subtract_mean: bool, rescale: bool, k: float, C: float):
    """``dL/dx`` for upstream ``g``, from the forward's saved ``x2d``, ``mean`` and ``1/sigma``."""
    return ops().input_grad(g.contiguous(), x2d.contiguous(), mean.contiguous(), rstd.contiguous(),
                            eps, centre, fairseq, subtract_mean, rescale, k, C)

"""Hand-written C++ kernels for CPU tensors: the math of :mod:`hf_adanorm.functional`, one pass per row.

The source, ``csrc/norm_cpu.cpp``, is built on first use with
:func:`torch.utils.cpp_extension.load` (about 10 s on two cores; needs a C++ compiler and
``ninja``) and cached on disk by torch, under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), so later processes only load it.  The kernels register
``torch.ops.hf_adanorm_cpu.forward`` and ``torch.ops.hf_adanorm_cpu.input_grad``.

Each row is read once from memory and kept in L1 across its passes: the forward writes
``z = C (1 - k y) y`` with the row's mean and ``1/sigma``; the backward writes
``dL/dx = (1/sigma) (g' - a mean(g') - b y mean(g' y))`` with ``g' = C (1 - k y) g``
(``a``, ``b`` as in :mod:`hf_adanorm.functional`).  Arithmetic is float32 for float32,
bfloat16 and float16 inputs; outputs take the input dtype.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BACKEND = "cpu"
SOURCE = Path(__file__).with_name("csrc") / "norm_cpu.cpp"


def build_flags() -> tuple[str, list[str], list[str]]:
    """``(name, cflags, ldflags)`` for this CPU and torch build.

    The vector-ISA flags follow the CPU torch itself dispatches to, and are part of the
    extension's name, so a cache shared by machines of different CPUs keeps one build each.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    isa = ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []
    # at::parallel_for runs its loop on torch's OpenMP pool only if this file is built with
    # OpenMP too; otherwise the `omp simd` reductions alone still vectorize.
    openmp = torch.backends.openmp.is_available()
    name = "hf_adanorm_cpu" + ("_avx2" if isa else "")
    return name, ["-O3", *isa, "-fopenmp" if openmp else "-fopenmp-simd"], ["-fopenmp"] if openmp else []


@functools.cache
def ops():
    """``torch.ops.hf_adanorm_cpu``, building the extension on the first call of the process."""
    from torch.utils.cpp_extension import load

    name, cflags, ldflags = build_flags()
    logger.info("hf_adanorm: building or loading the CPU kernels %s (first use in this process)", name)
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
             is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler or ninja; torch puts the whole command first
        lines = str(err).splitlines() or [type(err).__name__]
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])
        raise RuntimeError(f"building {name} failed: {reason}") from err
    _register_shapes()
    return torch.ops.hf_adanorm_cpu


def _register_shapes():
    """Shape-only versions of the ops, so fake-tensor tracing (e.g. torch.export's, or memory
    estimates under FakeTensorMode) sees them instead of failing on a real kernel."""
    def forward_shapes(x, eps, centre, fairseq, k, C):
        stats = x.new_empty((x.shape[0], 1), dtype=torch.float32)
        return torch.empty_like(x), stats, torch.empty_like(stats)

    def input_grad_shapes(g, x, mean, rstd, eps, centre, fairseq, subtract_mean, rescale, k, C):
        return torch.empty_like(x)

    torch.library.register_fake("hf_adanorm_cpu::forward", forward_shapes)
    torch.library.register_fake("hf_adanorm_cpu::input_grad", input_grad_shapes)


def forward(x2d: torch.Tensor, eps: float, centre: bool, fairseq: bool, k: float, C: float):
    """``(z, mean, 1/sigma)`` of each row of ``x2d``; ``mean`` and ``1/sigma`` are float32 ``(rows, 1)``."""
    return ops().forward(x2d.contiguous(), eps, centre, fairseq, k, C)


def input_grad(g: torch.Tensor, x2d: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, eps: float,
               centre: bool, fairseq: bool, subtract_mean: bool, rescale: bool, k: float, C: float):
    """``dL/dx`` for upstream ``g``, from the forward's saved ``x2d``, ``mean`` and ``1/sigma``."""
    return ops().input_grad(g.contiguous(), x2d.contiguous(), mean.contiguous(), rstd.contiguous(),
                            eps, centre, fairseq, subtract_mean, rescale, k, C)

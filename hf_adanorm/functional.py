"""The one normalization kernel behind every module in :mod:`hf_adanorm.norms`.

Notation, over the normalized (trailing) dimensions of size ``D``:

* centred ("layer") statistics:  ``xc = x - mean(x)``,  ``v = sum(xc**2) / (D - u)``
* uncentred ("rms") statistics:  ``xc = x``,            ``v = sum(x**2)  / (D - u)``

where ``u = 1`` for the unbiased variance of the official fairseq AdaNorm code
and ``u = 0`` otherwise.  The scale is

* ``eps_mode="torch"``   (default, as ``torch.nn.LayerNorm``):  ``sigma = sqrt(v + eps)``, ``u = 0``
* ``eps_mode="fairseq"`` (the paper's released code):          ``sigma = sqrt(v) + eps``, ``u = 1``
  for centred norms (``u = 0`` for RMS norms)

and ``y = xc / sigma``.  The output is ``z = phi * y`` where the factor
``phi = C * (1 - k * y)`` for AdaNorm and ``phi = 1`` otherwise.  ``phi`` is
treated as a constant in the backward pass (the paper's "detach" trick), so with
``g = dL/dz`` and ``g' = phi * g`` the input gradient is::

    dL/dx = (1 / sigma) * (g' - a * mean(g') - b * y * mean(g' * y))

with ``a = 1`` for centred norms whose mean is not detached (else 0) and
``b = 1`` in torch mode, ``b = sigma * D / ((D - u) * sqrt(v))`` in fairseq mode,
and ``b = 0`` when ``sigma`` is detached (DetachNorm).

Statistics are computed in float32 for half-precision inputs and the output is
returned in the input dtype.  Only ``x``, the per-row ``mean`` and ``1/sigma``
are saved for backward (``y`` is recomputed), so a norm here never saves more
than ``torch.nn.LayerNorm``, which also keeps its gain and bias.

Execution paths (all compute the equations above; tests/test_fast_paths.py checks
each against plain autograd):

* fused: for large CPU tensors in torch eps mode, the input gradient of AdaNorm,
  DetachNorm (mean or variance) and the RMS norms runs as one ``torch.compile``-d
  loop over rows, compiled once per (hidden size, dtype, variant) on first use (see
  ``COMPILE``, ``first_call_seconds``); the forward always takes the eager path;
* traced: inside a caller's ``torch.compile`` the same plain math is traced, so the
  norm joins the caller's graph without a break;
* triton: CUDA tensors, any mode, run the one-pass-per-row Triton kernels of
  :mod:`hf_adanorm.triton_norm` in both directions (see ``TRITON``);
* eager: otherwise (fairseq mode, small tensors, no compiler), torch's native
  LayerNorm kernels plus in-place element-wise ops.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import types
import warnings
from typing import Callable, Optional

import torch

_HALF = (torch.float16, torch.bfloat16)

logger = logging.getLogger(__name__)

# When the fused (torch.compile'd) kernels run: "auto" for CPU tensors of at least
# COMPILE_MIN_NUMEL elements (small ones would pay seconds of compilation for
# microseconds of work), "always", or "off".  Read from $HF_ADANORM_COMPILE.
COMPILE = os.environ.get("HF_ADANORM_COMPILE", "auto")
COMPILE_MIN_NUMEL = 1 << 20
# Wall time of each kernel's first call (which compiles it): keyed like _kernels for the
# torch.compile'd CPU kernels, ("triton_forward" | "triton_input_grad", dtype, D, flags...) on GPU.
first_call_seconds: dict[tuple, float] = {}
_kernels: dict[tuple, Callable] = {}  # compiled _input_grad_math per (dtype, D, variant)
_compile_failure: Optional[str] = None

# When the Triton kernels run: "auto" for CUDA tensors when Triton is installed, "off", or
# "always", which sends CPU tensors too: they then need Triton's interpreter
# (TRITON_INTERPRET=1), the way the tests check the kernels on machines without a GPU.
# Read from $HF_ADANORM_TRITON.
TRITON = os.environ.get("HF_ADANORM_TRITON", "auto")
_triton_failure: Optional[str] = None


def _flatten_rows(x: torch.Tensor, n_dims: int) -> torch.Tensor:
    """View ``x`` as (rows, D) where D is the product of its last ``n_dims`` sizes."""
    d = math.prod(x.shape[x.dim() - n_dims:]) if n_dims else 1
    return x.reshape(-1, d)


# ---------------------------------------------------------------- torch-mode math, written once
# Plain tensor code, traced as-is (then fused by inductor) when the caller
# torch.compile's the whole model.  _input_grad_math is also compiled on its own: its two
# row reductions are independent, so inductor makes it a single loop over rows, one read
# of x and g.  The forward is not: inductor (torch 2.13, CPU) splits the dependent
# mean -> variance reductions into separate passes over x, slower than torch's native
# LayerNorm kernel, so the forward always runs that kernel (see _eager_forward).

def _forward_math(x2d, eps: float, k: float, C: float, centre: bool):
    """``(z, mean, 1/sigma)`` with ``sigma = sqrt(var + eps)``, statistics in float32."""
    x32 = x2d.float()
    if centre:
        var, mean = torch.var_mean(x32, -1, keepdim=True, correction=0)
    else:
        var = x32.square().mean(-1, keepdim=True)
        mean = torch.zeros_like(var)
    rstd = torch.rsqrt(var + eps)
    y = (x32 - mean) * rstd
    return (y * (C - (C * k) * y)).to(x2d.dtype), mean, rstd


def _input_grad_math(g, x2d, mean, rstd, k: float, C: float, centre: bool,
                     subtract_mean: bool, rescale: bool):
    """``rstd * (g' - [mean(g')] - [y * mean(g' * y)])`` with ``g' = C (1 - k y) g``."""
    x32 = x2d.float()
    y = (x32 - mean) * rstd if centre else x32 * rstd
    gp = g.float() * (C - (C * k) * y)
    dx = gp
    if subtract_mean:
        dx = dx - gp.mean(-1, keepdim=True)
    if rescale:
        dx = dx - y * (gp * y).mean(-1, keepdim=True)
    return (dx * rstd).to(x2d.dtype)


def _fused_backward_pays(centre, subtract_mean, rescale, k, C) -> bool:
    """False where torch's own kernels already take one pass: g / sigma, or LayerNorm's backward."""
    if k or C != 1.0:
        return True
    if not (subtract_mean or rescale):
        return False
    return not (centre and subtract_mean and rescale)


def _compiled_path_applies(x: torch.Tensor) -> bool:
    return (COMPILE != "off" and _compile_failure is None and x.device.type == "cpu"
            and x.dtype in (torch.float32, *_HALF)
            and (COMPILE == "always" or x.numel() >= COMPILE_MIN_NUMEL)
            and not torch.compiler.is_compiling())


def _run_compiled(math_fn: Callable, key: tuple, *args):
    """``math_fn(*args)`` as a compiled kernel cached under ``key``; None if compiling fails."""
    global _compile_failure
    kernel = _kernels.get(key)
    first_call = kernel is None
    if first_call:
        # A private copy of the code object gives every key its own dynamo cache, so many
        # hidden sizes and dtypes never exhaust dynamo's per-function recompile limit
        # (past it, dynamo would silently run the slow unfused ops).
        code_copy = types.FunctionType(math_fn.__code__.replace(), math_fn.__globals__, math_fn.__name__)
        kernel = _kernels[key] = torch.compile(code_copy)
    start = time.perf_counter()
    try:
        out = kernel(*args)
    except Exception as err:  # noqa: BLE001 - no C++ compiler, unsupported platform ...
        _compile_failure = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"hf_adanorm: torch.compile failed ({_compile_failure}); using eager "
                      "kernels from now on (set HF_ADANORM_COMPILE=off to skip the attempt)")
        return None
    if first_call:
        first_call_seconds[key] = time.perf_counter() - start
        logger.info("hf_adanorm: compiled %s in %.1f s", key, first_call_seconds[key])
    return out


# ---------------------------------------------------------------- Triton kernels (GPU)

def _triton_kernels(x: torch.Tensor) -> Optional[types.ModuleType]:
    """:mod:`hf_adanorm.triton_norm` when its kernels should run on ``x``, else None."""
    global _triton_failure
    if (TRITON == "off" or _triton_failure is not None or torch.compiler.is_compiling()
            or (x.device.type != "cuda" and TRITON != "always") or x.dtype not in (torch.float32, *_HALF)):
        return None
    try:
        from . import triton_norm
    except ImportError as err:  # no Triton: torch's own CUDA kernels do the work
        _triton_failure = f"Triton is not installed ({err})"
        return None
    return triton_norm if x.shape[-1] <= triton_norm.MAX_ROW else None


def _run_triton(kernel: Callable, key: tuple, *args):
    """``kernel(*args)``, or None (with one warning, then eager for good) if Triton fails.

    Triton compiles a kernel on its first launch for each specialization (dtype, flags, block
    size; cached on disk after): the first call's wall time per ``key`` goes into
    ``first_call_seconds``, next to the CPU kernels' compile times.
    """
    global _triton_failure
    start = time.perf_counter()
    try:
        out = kernel(*args)
        if key not in first_call_seconds:
            first_call_seconds[key] = time.perf_counter() - start
        return out
    except Exception as err:  # noqa: BLE001 - an unsupported GPU or Triton version ...
        _triton_failure = f"{type(err).__name__}: {err}".splitlines()[0]
        warnings.warn(f"hf_adanorm: the Triton kernel failed ({_triton_failure}); using torch's "
                      "kernels from now on (set HF_ADANORM_TRITON=off to skip the attempt)")
        return None


# ---------------------------------------------------------------- eager kernels (any mode)

@functools.lru_cache(maxsize=64)
def _unit_gain(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.ones(d, dtype=dtype, device=device)


def _native_half(x: torch.Tensor, centre: bool, fairseq: bool, k: float, C: float) -> bool:
    """Whether torch's mixed-precision CPU LayerNorm serves this half-precision case whole.

    Given a float32 gain, it takes half inputs directly (statistics in float32, result
    rounded once to the input dtype), saving the float32 copies.  Not for AdaNorm: its
    factor would then be computed from an already rounded y.
    """
    return (x.dtype in _HALF and x.device.type == "cpu" and centre and not fairseq
            and not k and C == 1.0)


def _eager_forward(x, eps, centre, fairseq, k, C):
    d = x.shape[-1]
    if _native_half(x, centre, fairseq, k, C):
        return torch.ops.aten.native_layer_norm(x, [d], _unit_gain(d, torch.float32, x.device), None, eps)
    x32 = x.float() if x.dtype in _HALF else x
    if centre and not fairseq:
        # The native kernel is the fastest eager way to get y, mean and 1/sigma at once.
        # On CPU a unit gain gives the same y bit for bit and is faster than no gain
        # (torch 2.13: its gain-less variant takes a slower loop).
        gain = _unit_gain(d, x32.dtype, x32.device) if x32.device.type == "cpu" else None
        y, mean, rstd = torch.ops.aten.native_layer_norm(x32, [d], gain, None, eps)
    else:
        mean = x32.mean(-1, keepdim=True) if centre else x32.new_zeros(x32.shape[0], 1)
        xc = x32 - mean if centre else x32
        u = 1 if (centre and fairseq) else 0
        v = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).square_() / max(d - u, 1)
        sigma = v.sqrt() + eps if fairseq else (v + eps).sqrt()
        rstd = sigma.reciprocal()
        y = xc * rstd
    if k:  # y is a fresh buffer: turn it into (1 - k y) y in place
        y.addcmul_(y, y, value=-k)
    if C != 1.0:
        y.mul_(C)
    return y, mean, rstd


def _eager_input_grad(g, x, mean, rstd, eps, centre, fairseq, subtract_mean, rescale, k, C):
    d = x.shape[-1]
    native = centre and rescale and not fairseq  # torch's LayerNorm backward does the work
    if native and _native_half(x, centre, fairseq, k, C):
        dx = torch.ops.aten.native_layer_norm_backward(
            g.contiguous(), x, [d], mean, rstd, _unit_gain(d, torch.float32, x.device), None,
            [True, False, False])[0]
        if not subtract_mean:
            dx.add_(g.mean(-1, keepdim=True, dtype=torch.float32) * rstd)
        return dx
    if x.dtype in _HALF:
        g, x = g.float(), x.float()
    x32 = x
    y_later = rescale and not native
    y = None
    if k or y_later:
        y = (x32 - mean).mul_(rstd) if centre else x32 * rstd
    gp = g
    if k:  # g' = C (1 - k y) g = C (g - k y g), into y's buffer when y is not needed later
        gp = torch.addcmul(g, y, g, value=-k, out=None if y_later else y)
    if C != 1.0:
        gp = gp * C if gp is g else gp.mul_(C)
    if native:
        # torch's LayerNorm input gradient for upstream g' is rstd (g' - mean(g') - y mean(g' y));
        # with the mean detached the mean(g') term is simply added back.
        dx = torch.ops.aten.native_layer_norm_backward(
            gp.contiguous(), x32, [d], mean, rstd, None, None, [True, False, False])[0]
        if not subtract_mean:
            dx.add_(gp.mean(-1, keepdim=True) * rstd)
        return dx
    dx = gp - gp.mean(-1, keepdim=True) if subtract_mean else gp
    if rescale:
        b = 1.0
        if fairseq:
            u = 1 if centre else 0
            sigma = rstd.reciprocal()
            s = sigma - eps
            # A constant row (s == 0) has y == 0, so the term vanishes there.
            b = torch.where(s > 0, sigma * d / (max(d - u, 1) * s.clamp_min(1e-30)), 0.0)
        dx = dx - b * y * (gp * y).mean(-1, keepdim=True)
    return dx * rstd


class _NormalizeFunction(torch.autograd.Function):
    """Normalize rows of a 2-D float tensor; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
        kernels, on_gpu = _triton_kernels(x2d), None
        if kernels is not None:  # None if it fails: then the paths below
            key = ("triton_forward", x2d.dtype, x2d.shape[-1], centre, fairseq)
            on_gpu = _run_triton(kernels.forward, key, x2d, eps, centre, fairseq, k, C)
        if on_gpu is not None:
            z, mean, rstd = on_gpu
        elif not fairseq and torch.compiler.is_compiling():
            z, mean, rstd = _forward_math(x2d, eps, k, C, centre)
        else:
            z, mean, rstd = _eager_forward(x2d, eps, centre, fairseq, k, C)
            z = z.to(x2d.dtype)
        ctx.save_for_backward(x2d, mean, rstd)
        ctx.conf = (eps, centre, fairseq, detach_mean, detach_scale, k, C)
        return z

    # Double backward raises: this backward treats mean and 1/sigma as saved constants,
    # so differentiating it again would silently give a wrong second derivative.
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x2d, mean, rstd = ctx.saved_tensors
        eps, centre, fairseq, detach_mean, detach_scale, k, C = ctx.conf
        subtract_mean, rescale = centre and not detach_mean, not detach_scale
        args = (grad_out, x2d, mean, rstd, k, C, centre, subtract_mean, rescale)
        dx = None
        kernels = _triton_kernels(x2d)
        if kernels is not None:  # any mode: mean and 1/sigma mean the same on every path
            # None if it fails: then the eager kernels below
            key = ("triton_input_grad", x2d.dtype, x2d.shape[-1], centre, fairseq, subtract_mean, rescale)
            dx = _run_triton(kernels.input_grad, key, grad_out, x2d, mean, rstd, eps, centre, fairseq,
                             subtract_mean, rescale, k, C)
        elif not fairseq and torch.compiler.is_compiling():
            dx = _input_grad_math(*args)
        elif (not fairseq and not torch.is_grad_enabled() and _compiled_path_applies(x2d)
              and _fused_backward_pays(centre, subtract_mean, rescale, k, C)):
            key = ("input_grad", x2d.dtype, x2d.shape[-1], centre, subtract_mean, rescale)
            # Contiguous operands only: inductor (torch 2.13) miscompiles a strided input
            # once k becomes a symbolic float (tests/test_fast_paths.py covers it).
            dx = _run_compiled(_input_grad_math, key, grad_out.contiguous(), x2d.contiguous(), *args[2:])
        if dx is None:
            dx = _eager_input_grad(grad_out, x2d, mean, rstd, eps, centre, fairseq,
                                   subtract_mean, rescale, k, C).to(x2d.dtype)
        return dx, None, None, None, None, None, None, None


def normalize(
    x: torch.Tensor,
    n_dims: int = 1,
    eps: float = 1e-5,
    *,
    centre: bool = True,
    eps_mode: str = "torch",
    detach_mean: bool = False,
    detach_scale: bool = False,
    k: float = 0.0,
    C: float = 1.0,
) -> torch.Tensor:
    """Normalize ``x`` over its last ``n_dims`` dimensions.

    ``z = C * (1 - k * y) * y`` with ``y = (x - mean) / sigma`` (``centre=True``)
    or ``y = x / rms`` (``centre=False``); the factor ``C * (1 - k * y)`` is
    detached in backward.  ``k = 0, C = 1`` gives plain LayerNorm-simple /
    RMSNorm-simple.  ``detach_mean`` / ``detach_scale`` detach the statistics
    (the paper's DetachNorm).  See the module docstring for the exact gradient.
    """
    if eps_mode not in ("torch", "fairseq"):
        raise ValueError(f"eps_mode must be 'torch' or 'fairseq', got {eps_mode!r}")
    shape = x.shape
    z = _NormalizeFunction.apply(
        _flatten_rows(x, n_dims), float(eps), centre, eps_mode == "fairseq",
        detach_mean, detach_scale, float(k), float(C),
    )
    return z.reshape(shape)

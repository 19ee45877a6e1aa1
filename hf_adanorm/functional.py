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

Execution paths (all compute the equations above; tests/test_fast_paths.py and
tests/test_triton.py check each against plain autograd):

* cpu: CPU tensors, any mode, run the hand-written C++ kernels of
  :mod:`hf_adanorm.cpu_kernels`, one pass over memory per direction, built once on
  first use and cached on disk (see ``CPU_KERNELS``);
* triton: CUDA tensors, any mode, run the one-pass-per-row Triton kernels of
  :mod:`hf_adanorm.triton_norm` in both directions (see ``TRITON``);
* traced: inside a caller's ``torch.compile`` the plain math below is traced, so the
  norm joins the caller's graph without a break;
* eager: otherwise (no C++ compiler, other devices, a kernel that failed), torch's
  native LayerNorm kernels plus in-place element-wise ops.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import types
import warnings
from typing import Optional

import torch

_HALF = (torch.float16, torch.bfloat16)

logger = logging.getLogger(__name__)

def _switch(variable: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(variable, "auto")
    if value not in choices:
        raise ValueError(f"${variable} must be one of {', '.join(choices)}; got {value!r}")
    return value


# Whether CPU tensors use the C++ kernels: "auto" (when they build) or "off".
# Read from $HF_ADANORM_CPU_KERNELS.
CPU_KERNELS = _switch("HF_ADANORM_CPU_KERNELS", ("auto", "off"))
# When the Triton kernels run: "auto" for CUDA tensors when Triton is installed, "off", or
# "always", which sends CPU tensors too: they then need Triton's interpreter
# (TRITON_INTERPRET=1), the way the tests check the kernels on machines without a GPU.
# Read from $HF_ADANORM_TRITON.
TRITON = _switch("HF_ADANORM_TRITON", ("auto", "off", "always"))
_SWITCHES = {"cpu": "HF_ADANORM_CPU_KERNELS", "triton": "HF_ADANORM_TRITON"}
# Why a kernel family was turned off for the rest of the process (None: it is on).
_failures: dict[str, Optional[str]] = {"cpu": None, "triton": None}
# Wall time of each kernel's first call, keyed ("<backend>_forward" | "<backend>_input_grad",
# dtype, D, flags...): it includes building the C++ kernels or compiling a Triton kernel.
first_call_seconds: dict[tuple, float] = {}


def _flatten_rows(x: torch.Tensor, n_dims: int) -> torch.Tensor:
    """View ``x`` as (rows, D) where D is the product of its last ``n_dims`` sizes."""
    d = math.prod(x.shape[x.dim() - n_dims:]) if n_dims else 1
    return x.reshape(-1, d)


# ---------------------------------------------------------------- torch-mode math, written once
# Plain tensor code, traced as-is (then fused by inductor) when the caller
# torch.compile's the whole model: the norm then joins the caller's graph.

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


# ---------------------------------------------------------------- hand-written kernels

def _kernels_for(x: torch.Tensor) -> Optional[types.ModuleType]:
    """The kernel module (:mod:`.cpu_kernels` or :mod:`.triton_norm`) for ``x``, or None for eager."""
    # Plain tensors only: subclasses (FakeTensor, DTensor, ...) bring their own dispatch, which
    # knows torch's ops but not these kernels; the eager path serves them.
    if (torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or x.dtype not in (torch.float32, *_HALF) or x.numel() == 0 or x.shape[-1] == 0):
        return None
    if TRITON != "off" and _failures["triton"] is None and (x.device.type == "cuda" or TRITON == "always"):
        try:
            from . import triton_norm
        except ImportError as err:  # no Triton: torch's own CUDA kernels do the work
            _failures["triton"] = f"Triton is not installed ({err})"
        else:
            if x.shape[-1] <= triton_norm.MAX_ROW:
                return triton_norm
    if x.device.type == "cpu" and CPU_KERNELS != "off" and _failures["cpu"] is None:
        from . import cpu_kernels
        return cpu_kernels
    return None


def _run(kernels: types.ModuleType, direction: str, key: tuple, *args):
    """``kernels.<direction>(*args)``, or None (with one warning, then eager for good) if it fails.

    The first call per ``key`` builds (C++) or compiles (Triton) the kernel; its wall time
    goes into ``first_call_seconds``.
    """
    backend = kernels.BACKEND
    key = (f"{backend}_{direction}", *key)
    start = time.perf_counter()
    try:
        out = getattr(kernels, direction)(*args)
    except Exception as err:  # noqa: BLE001 - no C++ compiler, an unsupported GPU or Triton ...
        _failures[backend] = f"{type(err).__name__}: {err}".splitlines()[0]
        name = "C++ CPU" if backend == "cpu" else "Triton"
        warnings.warn(f"hf_adanorm: the {name} kernel failed ({_failures[backend]}); using torch's "
                      f"kernels from now on (set {_SWITCHES[backend]}=off to skip the attempt)")
        return None
    if key not in first_call_seconds:
        first_call_seconds[key] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- eager kernels (any mode)

@functools.lru_cache(maxsize=64)
def _cached_unit_gain(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.ones(d, dtype=dtype, device=device)


def _unit_gain(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gain of ones for ``like``'s rows: cached for plain tensors; made alongside a tensor
    subclass (a FakeTensor must not meet a real tensor)."""
    d = like.shape[-1]
    return _cached_unit_gain(d, dtype, like.device) if type(like) is torch.Tensor else like.new_ones(d, dtype=dtype)


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
        return torch.ops.aten.native_layer_norm(x, [d], _unit_gain(x, torch.float32), None, eps)
    x32 = x.float() if x.dtype in _HALF else x
    if centre and not fairseq:
        # The native kernel is the fastest eager way to get y, mean and 1/sigma at once.
        # On CPU a unit gain gives the same y bit for bit and is faster than no gain
        # (torch 2.13: its gain-less variant takes a slower loop).
        gain = _unit_gain(x32, x32.dtype) if x32.device.type == "cpu" else None
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
            g.contiguous(), x, [d], mean, rstd, _unit_gain(x, torch.float32), None,
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
        kernels, out = _kernels_for(x2d), None
        if kernels is not None:  # None if it fails: then the paths below
            out = _run(kernels, "forward", (x2d.dtype, x2d.shape[-1], centre, fairseq),
                       x2d, eps, centre, fairseq, k, C)
        if out is not None:
            z, mean, rstd = out
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
        dx = None
        kernels = _kernels_for(x2d)
        if kernels is not None:  # any mode: mean and 1/sigma mean the same on every path
            key = (x2d.dtype, x2d.shape[-1], centre, fairseq, subtract_mean, rescale)
            dx = _run(kernels, "input_grad", key, grad_out, x2d, mean, rstd, eps, centre, fairseq,
                      subtract_mean, rescale, k, C)
        elif not fairseq and torch.compiler.is_compiling():
            dx = _input_grad_math(grad_out, x2d, mean, rstd, k, C, centre, subtract_mean, rescale)
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

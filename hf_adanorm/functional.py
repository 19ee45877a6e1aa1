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

One op layer: two ``torch.library`` custom ops, ``torch.ops.hf_adanorm.forward`` and
``torch.ops.hf_adanorm.input_grad``, compute the values; one ``autograd.Function`` gives them
their derivatives (see ``_NormalizeFunction`` for why this split).  torch.export sees the ops
whole; torch.compile sees them whole (the fast kernels run inside compiled code) or traces the
plain math, whichever was measured faster (``COMPILED_NORMS`` below); never a graph break.
Behind the ops, each path exists for one reason (tests/test_fast_paths.py and
tests/test_triton.py check each against plain autograd):

* cpu: CPU tensors, any mode: the hand-written C++ kernels of :mod:`hf_adanorm.cpu_kernels`,
  one pass over memory per direction, for speed (faster than torch's LayerNorm kernels,
  BENCHMARKS.md), built once on first use and cached on disk (see ``CPU_KERNELS``);
* triton: CUDA tensors, any mode: the one-pass-per-row Triton kernels of
  :mod:`hf_adanorm.triton_norm`, for speed on GPUs (see ``TRITON``);
* eager: everything else (float64, GPUs without Triton, other devices, a kernel call that
  failed): torch's native LayerNorm kernels plus in-place element-wise ops;
* :mod:`hf_adanorm.norm_math`: plain differentiable ops, where autograd must see inside the
  norm: double backward, forward-mode AD, torch.func transforms traced by torch.compile, and
  TorchScript / ONNX traces.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import time
import types
import warnings
from typing import Optional

import torch

from . import cpu_kernels, norm_math  # cpu_kernels checks $HF_ADANORM_CPU_CACHE_MB on import

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
# What torch.compile sees of a norm: "kernels", the op (the kernels above run inside compiled
# code); "math", the plain formulas of norm_math, which inductor fuses with the ops around them;
# or "auto", whichever was measured faster (benchmarks/bench_compiled_norms.py, BENCHMARKS.md
# "Inside torch.compile"): on CPU the math for LayerNorm-simple and the DetachNorms (0.50-0.90x
# the kernels' time at 8192x768, 0.68-1.05x at 4096x384) and the kernels for AdaNorm (the math
# takes 1.00-1.16x); on CUDA the choice is unmeasured, so the Triton kernels stay. Read from
# $HF_ADANORM_COMPILED_NORMS when this module is imported (dynamo guards on its value).
COMPILED_NORMS = _switch("HF_ADANORM_COMPILED_NORMS", ("auto", "kernels", "math"))


def _compiled_as_math(x: torch.Tensor, k: float) -> bool:
    """Whether torch.compile, now tracing a norm of ``x`` (AdaNorm's ``k``, 0 for the others),
    should see its plain formulas. torch.export (which compiles too) keeps the op unless "math":
    its graph is a program to save and load."""
    if torch._C._are_functorch_transforms_active():
        # jvp, grad of grad, jacfwd/hessian traced by dynamo: it traces the Function without its
        # rules for them (which it refuses), and the op has none, so the derivative would be 0
        return True
    if COMPILED_NORMS != "auto" or torch.compiler.is_exporting():
        return COMPILED_NORMS == "math"
    return x.device.type == "cpu" and k == 0
_SWITCHES = {"cpu": "HF_ADANORM_CPU_KERNELS", "triton": "HF_ADANORM_TRITON"}
# Why a kernel family cannot run in this process at all (None: it can): no Triton, or C++
# kernels that do not build.  A kernel *call* that fails falls back for that call only.
_failures: dict[str, Optional[str]] = {"cpu": None, "triton": None}
# How many kernel calls failed (each served by the eager kernels instead), per backend.
failed_calls: collections.Counter = collections.Counter()
# Wall time of each kernel's first call, keyed ("<backend>_forward" | "<backend>_input_grad",
# dtype, D, flags...): it includes building the C++ kernels or compiling a Triton kernel.
first_call_seconds: dict[tuple, float] = {}


def _flatten_rows(x: torch.Tensor, n_dims: int) -> torch.Tensor:
    """View ``x`` as (rows, D) where D is the product of its last ``n_dims`` sizes."""
    d = math.prod(x.shape[x.dim() - n_dims:]) if n_dims else 1
    return x.reshape(-1, d)


# ---------------------------------------------------------------- hand-written kernels

def _kernels_for(x: torch.Tensor) -> Optional[types.ModuleType]:
    """The kernel module (:mod:`.cpu_kernels` or :mod:`.triton_norm`) for ``x``, or None for eager."""
    # Plain tensors only: subclasses (FakeTensor, DTensor, ...) bring their own dispatch, which
    # knows torch's ops but not these kernels; the eager path serves them.
    if (type(x) is not torch.Tensor or x.dtype not in (torch.float32, *_HALF) or x.numel() == 0 or x.shape[-1] == 0):
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
        return cpu_kernels
    return None


def _run(kernels: types.ModuleType, direction: str, key: tuple, *args):
    """``kernels.<direction>(*args)``, or None (with a warning) if it fails.

    A failed call falls back to the eager kernels for that call only: a transient
    out-of-memory error or one odd shape must not switch the kernels off for everything else.
    Only kernels that cannot be built at all (``BuildError``) are given up for the process.
    The first call per ``key`` builds (C++) or compiles (Triton) the kernel; its wall time
    goes into ``first_call_seconds``.
    """
    backend = kernels.BACKEND
    key = (f"{backend}_{direction}", *key)
    start = time.perf_counter()
    try:
        out = getattr(kernels, direction)(*args)
    except Exception as err:  # noqa: BLE001 - no C++ compiler, an unsupported GPU, out of memory ...
        why = f"{type(err).__name__}: {err}".splitlines()[0]
        name = "C++ CPU" if backend == "cpu" else "Triton"
        if isinstance(err, getattr(kernels, "BuildError", ())):
            _failures[backend] = why
            warnings.warn(f"hf_adanorm: the {name} kernels are unavailable ({why}); using torch's "
                          f"kernels from now on (set {_SWITCHES[backend]}=off to skip the attempt)")
            return None
        failed_calls[backend] += 1
        x = args[1] if direction == "input_grad" else args[0]
        warnings.warn(f"hf_adanorm: the {name} {direction} kernel failed on a {x.dtype} tensor of shape "
                      f"{tuple(x.shape)} on {x.device} ({why}); torch's kernels serve this call "
                      f"(set {_SWITCHES[backend]}=off to skip the kernel)")
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
        if centre:  # fairseq: take out the mean's rounding error, as norm_math._statistics does (why there)
            mean += (x32 - mean).mean(-1, keepdim=True)
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


# ---------------------------------------------------------------- the op layer

def _statistics_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_kernels(x2d: torch.Tensor, eps: float, centre: bool, fairseq: bool, k: float,
                     C: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, mean, 1/sigma)`` of the rows of ``x2d``, on the fastest path that runs."""
    kernels, out = _kernels_for(x2d), None
    if kernels is not None:  # None if it fails: then the eager kernels
        out = _run(kernels, "forward", (x2d.dtype, x2d.shape[-1], centre, fairseq),
                   x2d, eps, centre, fairseq, k, C)
    if out is None:
        z, mean, rstd = _eager_forward(x2d, eps, centre, fairseq, k, C)
        out = z.to(x2d.dtype), mean, rstd
    return out


_forward_op = torch.library.custom_op("hf_adanorm::forward", mutates_args=())(_forward_kernels)


@_forward_op.register_fake
def _(x2d, eps, centre, fairseq, k, C):
    stats = x2d.new_empty((x2d.shape[0], 1), dtype=_statistics_dtype(x2d))
    return torch.empty_like(x2d), stats, torch.empty_like(stats)


def _input_grad_kernels(g: torch.Tensor, x2d: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        eps: float, centre: bool, fairseq: bool, subtract_mean: bool, rescale: bool,
                        k: float, C: float) -> torch.Tensor:
    """``dL/dx`` for upstream ``g`` from the forward's ``x2d``, ``mean`` and ``1/sigma``."""
    kernels, dx = _kernels_for(x2d), None
    if kernels is not None:  # any mode: mean and 1/sigma mean the same on every path
        key = (x2d.dtype, x2d.shape[-1], centre, fairseq, subtract_mean, rescale)
        dx = _run(kernels, "input_grad", key, g, x2d, mean, rstd, eps, centre, fairseq,
                  subtract_mean, rescale, k, C)
    if dx is None:
        dx = _eager_input_grad(g, x2d, mean, rstd, eps, centre, fairseq, subtract_mean, rescale,
                               k, C).to(x2d.dtype)
    return dx


_input_grad_op = torch.library.custom_op("hf_adanorm::input_grad", mutates_args=())(_input_grad_kernels)


@_input_grad_op.register_fake
def _(g, x2d, mean, rstd, eps, centre, fairseq, subtract_mean, rescale, k, C):
    return torch.empty_like(x2d)


def _as_rows(t: torch.Tensor, in_dim: Optional[int], batch: int) -> torch.Tensor:
    """A (batch * rows, D) tensor of ``t`` batched at ``in_dim`` (None: the same for every batch)."""
    t = t.expand(batch, *t.shape) if in_dim is None else t.movedim(in_dim, 0)
    return t.reshape(-1, t.shape[-1])


# vmap: every row is normalized by itself, so a batch of row-sets is just more rows.
@_forward_op.register_vmap
def _(info, in_dims, x2d, eps, centre, fairseq, k, C):
    rows = _as_rows(x2d, in_dims[0], info.batch_size)
    z, mean, rstd = _forward_op(rows, eps, centre, fairseq, k, C)
    b = info.batch_size
    return (z.view(b, -1, z.shape[-1]), mean.view(b, -1, 1), rstd.view(b, -1, 1)), (0, 0, 0)


@_input_grad_op.register_vmap
def _(info, in_dims, g, x2d, mean, rstd, *conf):
    b = info.batch_size
    dx = _input_grad_op(*(_as_rows(t, d, b) for t, d in zip((g, x2d, mean, rstd), in_dims)), *conf)
    return dx.view(b, -1, dx.shape[-1]), 0


# The ops' overloads, called directly: half the dispatch time of the CustomOpDef objects.
_FORWARD = torch.ops.hf_adanorm.forward.default
_INPUT_GRAD = torch.ops.hf_adanorm.input_grad.default


def _plain_eager() -> bool:
    """Whether nothing traces or transforms this call: then the ops' Python bodies are called
    directly, skipping the custom-op dispatch (~20 us a call, as much as the kernel itself on
    small rows).  torch.compile, torch.export, make_fx, FakeTensorMode and torch.func go through
    the op.  Tensor subclasses of their own (DTensor ...) are plain eager: the bodies give them
    torch's ops, which they know how to run, where the op would need a rule of theirs."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch._C._len_torch_dispatch_stack())


class _NormalizeFunction(torch.autograd.Function):
    """The derivatives of the op layer, in every mode autograd has; see the module docstring.

    Why an ``autograd.Function`` over ``torch.library.register_autograd``: a custom op's
    autograd has no forward-mode rule (``torch.func.jvp``, ``forward_ad``), and this one
    Function gives all of them: ``setup_context`` (torch.func), a ``vmap`` rule, ``jvp``, and a
    backward that, when it is itself
    differentiated (``create_graph=True``, torch.func), is computed with the differentiable
    ops of :mod:`hf_adanorm.norm_math`, so a Hessian-vector product or a gradient penalty
    is exact.  Otherwise the backward is the kernel op, as fast as before.
    """

    # (The forward-mode rule is added by _NormalizeFunctionWithJvp below.)

    @staticmethod
    def vmap(info, in_dims, x2d, *conf):
        """A batch of row-sets is more rows: apply the Function to all of them at once. Calling
        ``apply`` again keeps autograd and any transform outside this vmap (``grad(vmap(f))``,
        ``jacrev``, a plain ``.backward()``) on the Function's own rules. torch's generated rule
        (``generate_vmap_rule``) cannot be differentiated here: the backward of the generated
        Function fails on the ``None`` gradients of the non-differentiable mean and 1/sigma."""
        b = info.batch_size
        # (torch.compile does not come here: dynamo traces forward, and the op's own vmap rule batches.
        # The guard keeps a Function with a jvp, which dynamo refuses, out of a traced graph anyway.)
        function = _NormalizeFunction if torch.compiler.is_compiling() else _NormalizeFunctionWithJvp
        z, mean, rstd = function.apply(_as_rows(x2d, in_dims[0], b), *conf)
        return (z.view(b, -1, z.shape[-1]), mean.view(b, -1, 1), rstd.view(b, -1, 1)), (0, 0, 0)

    @staticmethod
    def forward(x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
        op = _forward_kernels if _plain_eager() else _FORWARD
        return op(x2d, eps, centre, fairseq, k, C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x2d, *ctx.conf = inputs  # eps, centre, fairseq, detach_mean, detach_scale, k, C
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2d, mean, rstd)  # x, one mean and 1/sigma per row: no more than nn.LayerNorm
        ctx.save_for_forward(x2d)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        if grad_out is None:
            return (None,) * 8
        x2d, mean, rstd = ctx.saved_tensors
        eps, centre, fairseq, detach_mean, detach_scale, k, C = ctx.conf
        if torch.is_grad_enabled() and (grad_out.requires_grad or x2d.requires_grad):
            # create_graph=True: this backward will be differentiated in turn.
            dx = norm_math.input_grad(grad_out, x2d, *ctx.conf)
        else:
            op = _input_grad_kernels if _plain_eager() else _INPUT_GRAD
            dx = op(grad_out, x2d, mean, rstd, eps, centre, fairseq, centre and not detach_mean,
                    not detach_scale, k, C)
        return dx, None, None, None, None, None, None, None


class _NormalizeFunctionWithJvp(_NormalizeFunction):
    """The Function with its forward-mode rule, and a faster ``apply``: used outside
    torch.compile, whose dynamo refuses to trace an ``autograd.Function`` that has a ``jvp``
    (torch 2.13) or its own ``apply``."""

    @classmethod
    def apply(cls, *args):
        # torch.autograd.Function.apply binds the arguments to forward's signature (inspect, ~30 us
        # a call) for Functions with setup_context; normalize() passes all of them positionally, so
        # outside torch.func transforms (which need that path) the C++ apply is called directly.
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        (x2d,) = ctx.saved_tensors
        return norm_math.tangent(x_tangent, x2d, *ctx.conf), None, None


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
    conf = (float(eps), centre, eps_mode == "fairseq", detach_mean, detach_scale, float(k), float(C))
    if (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or (torch.compiler.is_compiling() and _compiled_as_math(x, k))):
        # A TorchScript trace or an ONNX graph can hold neither a Python autograd.Function nor a
        # Python custom op: record plain torch ops, which run and differentiate anywhere.
        return norm_math.decomposed(x, n_dims, *conf)
    shape = x.shape
    function = _NormalizeFunction if torch.compiler.is_compiling() else _NormalizeFunctionWithJvp
    return function.apply(_flatten_rows(x, n_dims), *conf)[0].reshape(shape)

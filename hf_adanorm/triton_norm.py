"""Triton kernels for the GPU: the math of :mod:`hf_adanorm.functional` in one pass per row.

One program normalizes one row of ``D`` elements held whole in registers, so each
direction touches memory once, the minimum for a norm:

* forward reads ``x`` and writes ``z`` (plus 8 bytes per row: ``mean``, ``1/sigma``);
* backward reads ``x``, ``g = dL/dz`` and the row statistics and writes ``dL/dx``, with
  no gain/bias gradients to reduce across rows (torch's LayerNorm backward has those).

With ``y = (x - mean) / sigma`` (``mean = 0`` for RMS norms), the forward stores
``z = y * (C - C k y)`` and the backward computes, with ``g' = g * (C - C k y)``::

    dL/dx = (1 / sigma) * (g' - a * mean(g') - b * y * mean(g' * y))

``a`` and ``b`` as in :mod:`hf_adanorm.functional` (``a = 0`` with the mean detached or for
RMS norms, ``b = 0`` with sigma detached, ``b = sigma D / ((D - u) sqrt(v))`` in fairseq
mode). Arithmetic is float32 whatever the input dtype; outputs take the input dtype.

On a machine without a GPU the same kernels run in Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which is how the tests
check them against the reference on CPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BACKEND = "triton"

# One row per program, held in registers: past this many elements a row would spill.
MAX_ROW = 1 << 16


def launch_settings(d: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``d`` elements: about 8 elements per thread."""
    block = triton.next_power_of_2(d)
    return block, max(1, min(32, block // 256))


@triton.jit
def _forward_kernel(X, Z, MEAN, RSTD, x_row_stride, z_row_stride, n_cols, denominator, eps, k, C,
                    CENTRE: tl.constexpr, FAIRSEQ: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows x stride can pass 2**31
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    if CENTRE:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(inside, x - mean, 0.0)
        if FAIRSEQ:  # the mean's rounding error out: see norm_math._statistics (a constant row gives y = 0)
            mean += tl.sum(xc, axis=0) / n_cols
            xc = tl.where(inside, x - mean, 0.0)
    else:
        mean = 0.0  # RMS norms: not centred (the saved "mean" is 0, as on the eager path)
        xc = x
    var = tl.sum(xc * xc, axis=0) / denominator
    if FAIRSEQ:
        rstd = 1.0 / (tl.sqrt(var) + eps)
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd
    z = y * (C - (C * k) * y)
    tl.store(Z + row * z_row_stride + cols, z.to(Z.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(G, X, DX, MEAN, RSTD, g_row_stride, x_row_stride, dx_row_stride, n_cols, denominator,
                     eps, k, C, CENTRE: tl.constexpr, FAIRSEQ: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
                     RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    if CENTRE:
        y = tl.where(inside, (x - mean) * rstd, 0.0)
    else:
        y = x * rstd
    g_prime = g * (C - (C * k) * y)  # the detached AdaNorm factor; 1 for the other norms
    dx = g_prime
    if SUBTRACT_MEAN:
        dx = dx - tl.sum(g_prime, axis=0) / n_cols
    if RESCALE:
        projection = tl.sum(g_prime * y, axis=0) / n_cols
        if FAIRSEQ:
            # d sigma / d x differs from 1/sigma's: b = sigma n_cols / ((n_cols - u) sqrt(v)), 0 on a constant row
            sigma = 1.0 / rstd
            root_var = sigma - eps
            b = tl.where(root_var > 0, sigma * n_cols / (denominator * tl.maximum(root_var, 1e-30)), 0.0)
            projection = projection * b
        dx = dx - y * projection
    tl.store(DX + row * dx_row_stride + cols, (dx * rstd).to(DX.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, D) tensor whose rows are contiguous (each program reads one row with stride 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU: Triton uses the current device, which for a model spread over
    several GPUs (``device_map="auto"``) is often another one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _denominator(d: int, centre: bool, fairseq: bool) -> int:
    return max(d - (1 if centre and fairseq else 0), 1)  # fairseq's unbiased variance


def forward(x2d: torch.Tensor, eps: float, centre: bool, fairseq: bool, k: float, C: float):
    """``(z, mean, 1/sigma)`` of the rows of ``x2d``; statistics float32 of shape (rows, 1)."""
    x2d = _rows(x2d)
    rows, d = x2d.shape
    z = torch.empty_like(x2d)
    mean = torch.empty(rows, 1, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty_like(mean)
    if rows:
        block, warps = launch_settings(d)
        with _device_of(x2d):
            _forward_kernel[(rows,)](x2d, z, mean, rstd, x2d.stride(0), z.stride(0), d,
                                     _denominator(d, centre, fairseq), eps, k, C,
                                     CENTRE=centre, FAIRSEQ=fairseq, BLOCK=block, num_warps=warps)
    return z, mean, rstd


def input_grad(g: torch.Tensor, x2d: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, eps: float,
               centre: bool, fairseq: bool, subtract_mean: bool, rescale: bool, k: float, C: float):
    """``dL/dx`` for upstream ``g``, from the statistics saved by :func:`forward`."""
    g, x2d = _rows(g), _rows(x2d)
    rows, d = x2d.shape
    dx = torch.empty_like(x2d)
    if rows:
        block, warps = launch_settings(d)
        with _device_of(x2d):
            _backward_kernel[(rows,)](g, x2d, dx, mean, rstd, g.stride(0), x2d.stride(0), dx.stride(0), d,
                                      _denominator(d, centre, fairseq), eps, k, C, CENTRE=centre,
                                      FAIRSEQ=fairseq, SUBTRACT_MEAN=subtract_mean, RESCALE=rescale,
                                      BLOCK=block, num_warps=warps)
    return dx

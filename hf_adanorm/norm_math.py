"""The norms written once more as plain, differentiable torch ops.

The kernels behind :mod:`hf_adanorm.functional` compute values only.  Where autograd must see
through the norm itself, these formulas serve instead:

* :func:`decomposed`: the forward, with ``.detach()`` exactly where the paper puts it.  Used
  when tracing for TorchScript or ONNX (``torch.jit.trace``, ``torch.onnx.export``), whose
  graphs can hold neither a Python ``autograd.Function`` nor a custom op, so that a saved
  trace or an ONNX file runs anywhere, and autograd differentiates it to every order.
* :func:`input_grad`: the closed-form backward as a function of ``x`` and ``g``, for a
  backward that is itself differentiated (``create_graph=True``, ``torch.func``).  Its
  derivative is the second derivative of the paper's norm; the AdaNorm factor and any
  detached statistic stay constant in it, as in the first derivative.
* :func:`tangent`: the forward-mode derivative (``torch.func.jvp``, ``forward_ad``).

Notation as in :mod:`hf_adanorm.functional`: rows of ``D`` elements, ``u = 1`` for the
unbiased variance of centred fairseq-mode norms, ``v = sum(xc^2) / (D - u)``,
``sigma = sqrt(v + eps)`` (torch) or ``sqrt(v) + eps`` (fairseq), ``y = (x - mean) / sigma``.
The Jacobian of ``y`` is symmetric,
``J = (1/sigma) (I - a 1 1^T / D - b y y^T / D)`` with ``b = d sigma/d x`` scaled
(``1`` in torch mode, ``sigma D / ((D - u) sqrt(v))`` in fairseq mode), so the backward is
``J (phi g)`` and the forward-mode derivative is ``phi (J t)`` with ``phi = C (1 - k y)``.
"""

from __future__ import annotations

import math

import torch

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _statistics(x, dims, eps: float, centre: bool, fairseq: bool):
    """``(mean or None, xc, sigma, sqrt(v) or None, D - 1 or None)`` over ``dims``, differentiable in ``x``.

    The last is ``D - u`` when ``u = 1`` (centred fairseq mode), else None (it is ``D``)."""
    mean = x.mean(dims, keepdim=True) if centre else None
    if centre and fairseq:
        # The rounding error d of the mean is what x - mean holds in a constant row, and fairseq's sigma
        # (std + eps, about eps there) would make y = d / (|d| + eps) of order 1, where it is 0. One more
        # pass takes the error out (the C++ kernels shift by a pivot for the same reason); the mean's
        # derivative is unchanged. (torch's eps inside the root keeps d / sqrt(eps) small, as nn.LayerNorm.)
        mean = mean + (x - mean).mean(dims, keepdim=True)
    xc = x - mean if centre else x
    v = (xc * xc).mean(dims, keepdim=True)
    dof = None
    if centre and fairseq:  # the unbiased variance; sizes only here, so traces stay free of them
        d = math.prod([x.shape[i] for i in dims])  # a list: dynamo cannot trace a generator here
        dof = max(d - 1, 1)
        v = v * (d / dof)
    root_v = None
    if fairseq:  # sqrt'(0) is infinite: a constant row (v = 0, xc = 0) would get 0 * inf = NaN
        positive = v > 0
        root_v = torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))
    sigma = root_v + eps if fairseq else (v + eps).sqrt()
    return mean, xc, sigma, root_v, dof


def decomposed(x: torch.Tensor, n_dims: int, eps: float, centre: bool, fairseq: bool,
               detach_mean: bool, detach_scale: bool, k: float, C: float) -> torch.Tensor:
    """``z = phi y`` over the last ``n_dims`` dimensions, ``phi = C (1 - k y)`` detached."""
    dims = tuple(range(x.dim() - n_dims, x.dim()))
    xf = x.to(_compute_dtype(x))
    mean, _, sigma, _, _ = _statistics(xf, dims, eps, centre, fairseq)
    if centre:
        xf = xf - (mean.detach() if detach_mean else mean)
    y = xf / (sigma.detach() if detach_scale else sigma)
    z = (C * (1.0 - k * y)).detach() * y if k else (y * C if C != 1.0 else y)
    return z.to(x.dtype)


def _apply_jacobian(t, x, eps, centre, fairseq, detach_mean, detach_scale, k, C, *, factor_first):
    """``J (phi t)`` (backward) or ``phi (J t)`` (forward mode) for rows of ``x``, differentiable.

    Mirrors autograd of :func:`decomposed`: a detached mean is a constant in ``x - mean``,
    but ``d sigma / d x`` keeps the live mean it has in the forward.
    """
    dtype = _compute_dtype(x)
    xf, t = x.to(dtype), t.to(dtype)
    dims = (-1,)
    mean, xc_live, sigma, root_v, dof = _statistics(xf, dims, eps, centre, fairseq)
    s = sigma.detach() if detach_scale else sigma
    xc = (xf - mean.detach()) if (centre and detach_mean) else xc_live
    y = xc / s
    phi = (C * (1.0 - k * y)).detach() if k else C
    out = t * phi if factor_first else t
    result = out
    if centre and not detach_mean:
        result = result - out.mean(-1, keepdim=True)
    result = result / s
    if not detach_scale:
        # d sigma / d x = xc_live / (dof sigma) in torch mode, xc_live / (dof sqrt(v)) in fairseq mode;
        # a constant row (v = 0) has xc = 0, so the term is 0 there.
        dof = dof or xf.shape[-1]
        if fairseq:
            safe = torch.where(root_v > 0, root_v, torch.ones_like(root_v))
            dsigma = torch.where(root_v > 0, xc_live / (dof * safe), torch.zeros_like(xc_live))
        else:
            dsigma = xc_live / (dof * sigma)
        # J_ij = (delta_ij - a / D) / s - xc_i dsigma_j / s^2: the backward contracts over i, the tangent over j.
        if factor_first:
            result = result - (out * xc).sum(-1, keepdim=True) / (s * s) * dsigma
        else:
            result = result - xc / (s * s) * (dsigma * out).sum(-1, keepdim=True)
    if not factor_first:
        result = result * phi
    return result.to(x.dtype)


def input_grad(g, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
    """``dL/dx`` for upstream ``g``, as differentiable ops in ``g`` and ``x2d``."""
    return _apply_jacobian(g, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C, factor_first=True)


def tangent(t, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
    """The forward-mode derivative of ``z`` along ``t`` (``phi`` constant, as in backward)."""
    return _apply_jacobian(t, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C, factor_first=False)

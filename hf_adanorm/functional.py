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
"""

from __future__ import annotations

import math

import torch

_HALF = (torch.float16, torch.bfloat16)


def _flatten_rows(x: torch.Tensor, n_dims: int) -> torch.Tensor:
    """View ``x`` as (rows, D) where D is the product of its last ``n_dims`` sizes."""
    d = math.prod(x.shape[x.dim() - n_dims:]) if n_dims else 1
    return x.reshape(-1, d)


class _NormalizeFunction(torch.autograd.Function):
    """Normalize rows of a 2-D float tensor; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
        x32 = x2d.float() if x2d.dtype in _HALF else x2d
        d = x32.shape[-1]
        if centre and not fairseq:
            # The native kernel is the fastest way to get y, mean and 1/sigma at once.
            y, mean, rstd = torch.ops.aten.native_layer_norm(x32, [d], None, None, eps)
        else:
            mean = x32.mean(-1, keepdim=True) if centre else x32.new_zeros(x32.shape[0], 1)
            xc = x32 - mean if centre else x32
            u = 1 if (centre and fairseq) else 0
            v = xc.pow(2).sum(-1, keepdim=True) / max(d - u, 1)
            sigma = v.sqrt() + eps if fairseq else (v + eps).sqrt()
            rstd = sigma.reciprocal()
            y = xc * rstd
        z = y * (C * (1.0 - k * y)) if k else (y * C if C != 1.0 else y)
        ctx.save_for_backward(x2d, mean, rstd)
        ctx.conf = (eps, centre, fairseq, detach_mean, detach_scale, k, C)
        return z.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, mean, rstd = ctx.saved_tensors
        eps, centre, fairseq, detach_mean, detach_scale, k, C = ctx.conf
        x32 = x2d.float() if x2d.dtype in _HALF else x2d
        g = grad_out.float() if grad_out.dtype in _HALF else grad_out
        d = x32.shape[-1]
        y = (x32 - mean) * rstd if centre else x32 * rstd
        # g' = phi * g with phi = C (1 - k y) held constant.
        gp = g * (C * (1.0 - k * y)) if k else (g * C if C != 1.0 else g)
        subtract_mean = centre and not detach_mean
        if subtract_mean and not detach_scale and not fairseq:
            # Exactly torch's LayerNorm input gradient for an upstream gradient g'.
            dx = torch.ops.aten.native_layer_norm_backward(
                gp.contiguous(), x32, [d], mean, rstd, None, None, [True, False, False]
            )[0]
        else:
            dx = gp
            if subtract_mean:
                dx = dx - gp.mean(-1, keepdim=True)
            if not detach_scale:
                b = 1.0
                if fairseq:
                    u = 1 if centre else 0
                    sigma = rstd.reciprocal()
                    s = sigma - eps
                    # A constant row (s == 0) has y == 0, so the term vanishes there.
                    b = torch.where(s > 0, sigma * d / (max(d - u, 1) * s.clamp_min(1e-30)), 0.0)
                dx = dx - b * y * (gp * y).mean(-1, keepdim=True)
            dx = dx * rstd
        return dx.to(x2d.dtype), None, None, None, None, None, None, None


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

"""Find the LayerNorm-like modules of any model by what they compute.

A class-name list goes stale with every new architecture, so each leaf module
that could be a norm (only 1-D parameters of one size, or a parameter-free module
whose class name says "norm") is run once, on a private CPU copy with known
random parameters, against four references over the last dimension::

    layernorm:  s * (x - mean(x)) / sqrt(var(x) + eps) + b
    rmsnorm:    s * x / sqrt(mean(x**2) + eps) + b

with ``s`` in {w, 1 + w, 1} (Gemma-style norms store ``w`` with the 1 removed) and
``b`` in {bias, 0}.  The copy shares no tensors or hooks with the model, so
probing never changes it, works on the ``meta`` device and draws nothing from
the global random generator.  A module whose ``forward`` takes more than the one
tensor (a gated RMSNorm's ``gate``) is never a candidate: its one-input
replacement could not take the extra input.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "var_eps")
_BIAS_NAMES = re.compile(r"bias|beta", re.I)
_NOT_LAST_DIM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                 nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@dataclass(frozen=True)
class NormInfo:
    """What a detected norm computes: ``z = s * y + b`` over its last dimension."""

    kind: str  # "layernorm" or "rmsnorm"
    size: int
    eps: float
    gain: Optional[str]  # parameter name of the gain, if any
    gain_offset: float  # 1.0 when the scale is (1 + w)
    bias: Optional[str]  # parameter name of the bias, if any


def looks_like_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def read_eps(module: nn.Module) -> Optional[float]:
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _extra_inputs(module: nn.Module) -> list[str]:
    """Inputs of ``forward`` beyond the tensor to normalize (e.g. the ``gate`` of a gated RMSNorm)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params[1:]]


def _size_of(module: nn.Module, params) -> Optional[int]:
    if params:
        return params[0][1].shape[0]
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        return int(shape[0])
    return None


def _probe_copy(module: nn.Module, tensors: dict) -> nn.Module:
    """A shallow copy of ``module`` with fresh CPU tensors and no hooks."""
    clone = copy.copy(module)
    clone._parameters = OrderedDict(  # keep None slots: MPT sets an nn.LayerNorm's bias to None
        (n, None if p is None else nn.Parameter(tensors[n], requires_grad=False))
        for n, p in module._parameters.items())
    clone._buffers = OrderedDict(
        (n, None if b is None else (torch.zeros(b.shape) if b.is_meta else b.detach().float().cpu().clone()))
        for n, b in module._buffers.items()
    )
    for name in HOOK_DICTS:
        if name in module.__dict__:
            setattr(clone, name, OrderedDict())
    clone.training = False
    return clone


@contextmanager
def one_thread():
    """Probe tensors are tiny: a thread pool only adds overhead (20x on busy shared cores).

    Re-entrant and cheap when already on one thread, so callers wrap a whole walk once.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _references(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The normalized ``x`` with the module's own eps (a large eps, e.g. 1e-1, changes it visibly)."""
    x = x.double()
    if kind == "layernorm":
        xc = x - x.mean(-1, keepdim=True)
        return xc / (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def classify(module: nn.Module) -> tuple[Optional[NormInfo], Optional[str]]:
    """``(info, None)`` for a last-dimension LayerNorm/RMSNorm; else ``(None, reason)``.

    ``reason`` is None for modules that are plainly not norms (Linear, Dropout ...)
    and a sentence for norm-like modules that are deliberately left alone.
    """
    named = looks_like_norm(module)
    if isinstance(module, _NOT_LAST_DIM):
        return None, f"{type(module).__name__} does not normalize over the last dimension"
    if parametrize.is_parametrized(module):  # its weight is computed by other modules: not swappable
        names = ", ".join(module.parametrizations.keys())
        return None, (f"has a parametrization on {names} (torch.nn.utils.parametrize); remove it "
                      "(parametrize.remove_parametrizations) to patch this norm" if named else None)
    if any(True for _ in module.children()):  # a container: its leaves are classified on their own
        return None, None
    extra = _extra_inputs(module)
    if extra:  # the one-input replacement could not take them (and would drop e.g. a gate)
        return None, (f"forward takes more inputs than the tensor ({', '.join(extra)}): "
                      "not a plain last-dimension norm" if named else None)
    if hasattr(module, "weight_g") or hasattr(module, "weight_v"):
        return None, "weight-norm wrapper" if named else None
    if getattr(module, "data_format", "channels_last") != "channels_last":
        return None, f"data_format={module.data_format!r} normalizes over channels, not the last dimension"
    params = list(module.named_parameters(recurse=False))
    if any(p.dim() != 1 for _, p in params) or len(params) > 2:
        if named:
            dims = sorted({p.dim() for _, p in params})
            return None, f"parameters of dimension {dims} (e.g. a per-head norm): not a last-dimension norm"
        return None, None
    if not params and not named and not hasattr(module, "normalized_shape"):
        return None, None
    size = _size_of(module, params)
    if size is None or any(p.shape[0] != size for _, p in params):
        return None, ("cannot tell the normalized size" if named else None)
    if any(b is not None and b.dim() > 0 and b.numel() > 1 and n not in module._non_persistent_buffers_set
           for n, b in module._buffers.items()):  # non-persistent ones are scratch (or hf_adanorm's)
        return None, ("keeps per-channel buffers (running statistics?)" if named else None)
    with one_thread():
        return _probe(module, params, size, named)


def _probe(module, params, size, named) -> tuple[Optional[NormInfo], Optional[str]]:
    gen = torch.Generator().manual_seed(1234)
    values = {n: torch.randn(size, generator=gen) * 0.5 + (0.0 if _BIAS_NAMES.search(n) else 1.0)
              for n, _ in params}
    gains = [n for n in values if not _BIAS_NAMES.search(n)]
    biases = [n for n in values if _BIAS_NAMES.search(n)]
    if len(gains) > 1 or len(biases) > 1:
        return None, ("two gain-like or bias-like parameters" if named else None)
    rows = 7 if size != 7 else 5  # a middle dim unequal to size catches channels-first norms
    x = torch.randn(3, rows, size, generator=gen) * (1 + 3 * torch.rand(3, rows, 1, generator=gen))
    x = x + 4 * torch.rand(3, rows, 1, generator=gen) + 1  # non-zero means separate LN from RMS
    clone = _probe_copy(module, values)
    try:
        with torch.no_grad():
            out = type(module).forward(clone, x)
    except Exception as err:  # noqa: BLE001 - any failure means "not a last-dim norm"
        return None, (f"probe failed ({type(err).__name__}): not a last-dimension norm" if named else None)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None, ("output shape differs from input" if named else None)
    out = out.double()
    gain = values[gains[0]].double() if gains else None
    bias = values[biases[0]].double() if biases else 0.0
    own_eps = read_eps(module)
    for kind in ("layernorm", "rmsnorm"):
        ref = _references(x, kind, own_eps if own_eps is not None and own_eps >= 0 else 0.0)
        for offset in ((0.0, 1.0) if gain is not None else (None,)):
            scale = 1.0 if offset is None else gain + offset
            if torch.allclose(out, ref * scale + bias, rtol=2e-3, atol=2e-3):
                eps = own_eps
                return NormInfo(kind, size, eps if eps is not None else _estimate_eps(clone, module, size, offset or 0.0),
                                gains[0] if gains else None, offset or 0.0,
                                biases[0] if biases else None), None
    return None, ("does not compute a last-dimension LayerNorm or RMSNorm" if named else None)


def _estimate_eps(clone, module, size, offset) -> float:
    """Solve z = x / sqrt(v + eps) for eps on a low-variance input (no eps attribute found)."""
    for name in clone._parameters:  # neutral affine: gain 1 (0 for 1 + w), bias 0
        clone._parameters[name].data.fill_(0.0 if _BIAS_NAMES.search(name) else 1.0 - offset)
    x = torch.zeros(1, 2, size, dtype=torch.float64)
    x[..., 0], x[..., 1 % size] = 1e-3, -1e-3
    with torch.no_grad():
        out = type(module).forward(clone, x.float()).double()
    v, z = x.pow(2).mean(-1), out[..., 0]
    if not torch.isfinite(z).all() or (z == 0).any():
        return 1e-5
    return max(float(((x[..., 0] / z) ** 2 - v).mean()), 0.0)

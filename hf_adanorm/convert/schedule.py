"""How the norms are swapped during a conversion: a blend of each original norm into its
replacement, driven by a schedule of the optimizer step.

While converting, every replaced norm at module name ``n`` is wrapped in a
:class:`BlendedNorm` that computes

    z = (1 − α_n(t)) · source_n(x) + α_n(t) · target_n(x)

where ``source_n`` is what the model computed there before the swap (the original
LayerNorm with its gain and bias, frozen; or, for a norm whose gain and bias were folded
exactly into the next Linear layers, the plain normalization y those layers now expect),
``target_n`` is the hf_adanorm norm, and α_n(t) ∈ [0, 1] comes from the schedule at
optimizer step t. At α = 0 the student computes exactly the teacher's function; once
every α is 1 the wrappers are removed and only the target norms remain.

Schedules (``SCHEDULES``; ``ramp`` = ``ramp_fraction`` × total steps):

- ``blend``: every norm together, α(t) = min(1, t / ramp).
- ``layerwise``: the norms one after another in module order, norm i of n ramping
  linearly over [i·ramp/n, (i+1)·ramp/n].
- ``swap``: α = 1 from the first step (the naive swap, then distillation).

α depends on the step alone, so a resumed run recomputes it exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..blend import BlendedNorm  # noqa: F401 - here too: the wrapper this module's functions put in
from ..portable import OUTPUT_DTYPE_BUFFER, in_witness_dtype

SCHEDULES = ("blend", "layerwise", "swap")


def alphas(schedule: str, step: int, ramp_steps: int, count: int) -> list[float]:
    """α of each of ``count`` norms (module order) after ``step`` optimizer steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if schedule == "swap" or ramp_steps <= 0:
        return [1.0] * count
    if schedule == "blend":
        return [min(1.0, step / ramp_steps)] * count
    # norm i ramps over [i·ramp/n, (i+1)·ramp/n]; integers until the division keep 1.0 exact
    return [min(1.0, max(0.0, (step * count - i * ramp_steps) / ramp_steps)) for i in range(count)]


def wrap_norms(model: nn.Module, sources: dict[str, nn.Module]) -> dict[str, BlendedNorm]:
    """Wrap each module named in ``sources`` (the installed target norms) in a BlendedNorm."""
    wrapped = {}
    for name, source in sources.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        target = getattr(parent, attr)
        witness = target._buffers.get(OUTPUT_DTYPE_BUFFER)
        if isinstance(source, PlainNormalization) and witness is not None:  # its output's dtype is the target's
            source.register_buffer(OUTPUT_DTYPE_BUFFER, witness, persistent=False)
        blended = BlendedNorm(source, target)
        setattr(parent, attr, blended)
        wrapped[name] = blended
    return wrapped


def unwrap_norms(model: nn.Module, wrapped: dict[str, BlendedNorm]) -> None:
    """Put the target norms back in place of their wrappers."""
    for name, blended in wrapped.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, blended.target)


def set_alphas(wrapped: dict[str, BlendedNorm], values: list[float]) -> None:
    for blended, value in zip(wrapped.values(), values):
        blended.alpha = float(value)


class PlainNormalization(nn.Module):
    """y = (x − μ)/√(var + eps) over the last dimension: what a folded norm's Linear layers expect."""

    def __init__(self, eps: float, rms: bool = False):
        super().__init__()
        self.eps, self.rms = eps, rms

    def forward(self, x):
        if self.rms:
            return in_witness_dtype(self, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return in_witness_dtype(self, nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps))


def blend_sources(record: dict, original: Callable[[str], nn.Module]) -> dict:
    """What each norm of a patch ``record`` computed before the swap: a frozen copy of the
    original module (``original(name)``), or, for a norm whose gain and bias were folded exactly
    into the next layers, the plain normalization those layers now expect."""
    folded = set((record.get("fold") or {}).get("folded", {}))
    return {name: PlainNormalization(entry["eps"], rms=entry["kind"] == "rmsnorm") if name in folded
            else original(name) for name, entry in record["modules"].items()}

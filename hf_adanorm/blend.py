"""``BlendedNorm``: a norm being swapped in, ``(1 − α)·source(x) + α·target(x)``, and what the rest of the
library must know of it while it is in a model (the monitors, checkpoints, the remote-code reader).

Put in by ``hf-adanorm convert`` and ``GradualSwapCallback`` (:mod:`hf_adanorm.convert.schedule`), and
taken out once every α is 1. Its own module (torch only), so that every part can see it without the
convert package, which imports the training code.
"""

from __future__ import annotations

import torch
from torch import nn

# In a saved patch record: written while norms were still blended in (a Trainer checkpoint inside
# GradualSwapCallback's ramp). Such a folder resumes the ramp, but it is not a model of either norm:
# both readers refuse it (portable.check_record).
SWAP_IN_PROGRESS = "swap_in_progress"


class BlendedNorm(nn.Module):
    """``(1 − alpha) · source(x) + alpha · target(x)``; only ``target`` is trained."""

    def __init__(self, source: nn.Module, target: nn.Module):
        super().__init__()
        self.source = source.requires_grad_(False)
        self.target = target
        self.alpha = 0.0

    def forward(self, x):
        if self.alpha >= 1.0:
            return self.target(x)
        if self.alpha <= 0.0:
            return self.source(x)
        return torch.lerp(self.source(x), self.target(x), self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.3f}"


def blends_of(model: nn.Module) -> dict:
    """{name: BlendedNorm} of ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BlendedNorm)}


def inside(name: str, parents) -> bool:
    """Whether the module ``name`` lies inside one of the modules named ``parents``."""
    return any(name.startswith(parent + ".") for parent in parents)


def mark_swap_in_progress(model: nn.Module, record: dict) -> dict:
    """``record`` as it must be saved with ``model``: marked when norms are still blended in."""
    blends = blends_of(model)
    if not blends:
        return record
    return {**record, SWAP_IN_PROGRESS: {name: blend.alpha for name, blend in sorted(blends.items())}}

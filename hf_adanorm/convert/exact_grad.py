"""While distilling, differentiate every target norm exactly.

AdaNorm detaches its factor in backward: with ``y = (x − μ)/σ`` its forward is
``z = C(1 − k·y) ⊙ y``, but its backward treats ``C(1 − k·y)`` as a constant, so ``dz/dy`` is taken
as ``C(1 − k·y)`` where the forward's derivative is ``C(1 − 2k·y)``. DetachNorm detaches μ and/or σ.
These are the paper's choices for how a model *trains* with the norm, and fine-tuning after the
conversion keeps them. A conversion does something else: it fits the student's forward function to
the teacher's, and there a detached backward is not the gradient of the loss being minimised.

:func:`exact_backward` makes each such norm compute the same forward as the composition of the plain
normalization (LayerNorm-simple or RMSNorm-simple, whose backward is exact) and, for AdaNorm, the
map ``y ↦ C(1 − k·y) ⊙ y`` in plain torch ops, which autograd differentiates exactly. The model's
modules, parameters and state dict are unchanged; only each norm's ``forward`` is replaced while the
context is open, so forward hooks on the norms still fire. Measured on MiniLM → AdaNorm
(docs/conversion.md): the same loop reaches a higher cosine at every step with the exact gradient.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

from torch import nn

from ..norms import AdaNorm, DetachNorm, _normalize_trailing


def _plain(norm: nn.Module, x):
    """The norm's y = (x − μ)/σ (or x/rms) with no statistic detached."""
    return _normalize_trailing(x, norm.normalized_shape, type(norm).__name__, norm.eps, centre=norm.centre,
                               eps_mode=norm.eps_mode)


def _adanorm_exact(self: AdaNorm, x):
    y = _plain(self, x)
    return self.C * (1 - self.k * y) * y


def _detachnorm_exact(self: DetachNorm, x):
    return _plain(self, x)  # DetachNorm's forward is LayerNorm-simple's


EXACT_FORWARD = ((AdaNorm, _adanorm_exact), (DetachNorm, _detachnorm_exact))  # RMS variants are subclasses


@contextmanager
def exact_backward(model: nn.Module, enabled: bool = True):
    """Within the context every AdaNorm / DetachNorm of ``model`` has its forward's exact gradient;
    yields how many norms were changed. Nothing changes with ``enabled=False``."""
    changed = []
    if enabled:
        for module in model.modules():
            forward = next((f for cls, f in EXACT_FORWARD if isinstance(module, cls)), None)
            if forward is not None and "forward" not in vars(module):
                module.forward = types.MethodType(forward, module)
                changed.append(module)
    try:
        yield len(changed)
    finally:
        for module in changed:
            del module.forward

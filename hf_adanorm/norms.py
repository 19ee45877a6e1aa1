"""The normalization family of Xu et al. (2019), as drop-in ``nn.Module`` s.

Every module normalizes over its trailing ``normalized_shape`` (size ``D``) and
has no parameters.  With ``y = (x - mean(x)) / sigma`` (LayerNorm family) or
``y = x / rms(x)`` (RMS family), and ``sigma = sqrt(var(x) + eps)`` by default
(``eps_mode="fairseq"``: ``sigma = std_unbiased(x) + eps``, the paper's code; ``rms(x) + eps`` for
the RMS family). The gradients below are those of the torch mode; :mod:`hf_adanorm.functional` gives
the fairseq mode's, whose last term carries ``sigma D / ((D - 1) sqrt(v))``:

=====================  =====================================================
module                 output ``z`` (backward)
=====================  =====================================================
``LayerNormSimple``    ``y``
``AdaNorm``            ``C * (1 - k * y) * y``, factor detached in backward
``DetachNorm``         ``y`` with ``mean`` and/or ``sigma`` detached
``NoNorm``             ``x`` (the paper's "w/o Norm" baseline)
``RMSNormSimple``      ``x / rms(x)``
``RMSAdaNorm``         ``C * (1 - k * y) * y`` with ``y = x / rms(x)``
``RMSDetachNorm``      ``x / rms(x)`` with ``rms`` detached
=====================  =====================================================
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import torch
from torch import nn

from .functional import normalize
from .portable import OUTPUT_DTYPE_BUFFER, in_witness_dtype

ShapeLike = Union[int, Sequence[int], torch.Size]

DETACH_CHOICES = ("mean", "variance", "both")


def _as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def check_detach(detach: str) -> str:
    if detach not in DETACH_CHOICES:
        raise ValueError(f"detach must be one of {DETACH_CHOICES}, got {detach!r}")
    return detach


def check_eps_mode(eps_mode: str) -> str:
    if eps_mode not in ("torch", "fairseq"):
        raise ValueError(
            f"eps_mode must be 'torch' (sigma = sqrt(var + eps), like nn.LayerNorm) or "
            f"'fairseq' (sigma = unbiased std + eps, the paper's code); got {eps_mode!r}"
        )
    return eps_mode


def _is_real(value) -> bool:
    """A finite real number (numpy scalars included, bools and NaN/inf not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    """A Python int, not a bool (True would pass as 1) nor a float or a string from a JSON option."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_eps(eps) -> float:
    """A finite eps > 0: with 0 a constant row divides by zero, with inf every output is 0."""
    if not (_is_real(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0 (e.g. 1e-5), got eps={eps!r}")
    return float(eps)


def check_ada_params(k: float, C: float) -> None:
    """AdaNorm needs ``k > 0`` (else it is LayerNorm-simple) and ``C > 0``."""
    if not (_is_real(k) and k > 0):
        raise ValueError(f"AdaNorm needs a finite number k > 0 (the paper uses k = 0.1); got k={k!r}")
    if not (_is_real(C) and C > 0):
        raise ValueError(f"AdaNorm needs a finite number C > 0 (an output scale, e.g. 1.0); got C={C!r}")


def _normalize_trailing(x: torch.Tensor, normalized_shape: tuple[int, ...], owner: str, eps: float,
                        **kw) -> torch.Tensor:
    """:func:`normalize` over the trailing ``normalized_shape``; other shapes are refused, as
    ``F.layer_norm`` refuses them."""
    n = len(normalized_shape)
    if tuple(x.shape[x.dim() - n:]) != normalized_shape:
        raise RuntimeError(f"{owner} expects inputs ending in {list(normalized_shape)}, got shape {list(x.shape)}")
    return normalize(x, n, eps, **kw)


# torch.fx.symbolic_trace records a call to it as one node instead of tracing into it (the shape
# check cannot run on a Proxy, which has no shape); the traced module runs it, check included.
torch.fx.wrap("_normalize_trailing")


class _ParameterFreeNorm(nn.Module):
    """Shared state of all norms here: the shape, eps and eps mode, no parameters."""

    centre = True  # LayerNorm family subtracts the mean; RMS family does not.
    # Nothing to initialise: transformers skips a module so marked. Otherwise an _init_weights that goes
    # by class name (Gemma's: "RMSNorm" in it -> zeros_(module.weight)) fails on RMSNormSimple when loading.
    _is_hf_initialized = True

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, eps_mode: str = "torch"):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = check_eps(eps)
        self.eps_mode = check_eps_mode(eps_mode)

    def output_in_dtype_of(self, witness: torch.Tensor) -> None:
        """Cast outputs to ``witness``'s dtype when it is float16 or bfloat16, as the replaced norm did with
        its gain's (T5's): ``witness`` is a 0-element tensor kept as a non-persistent buffer, so its dtype
        follows ``.to()`` and ``.half()`` as the replaced gain's would."""
        self.register_buffer(OUTPUT_DTYPE_BUFFER, witness, persistent=False)

    def _normalize(self, x: torch.Tensor, **kw) -> torch.Tensor:
        return in_witness_dtype(self, _normalize_trailing(x, self.normalized_shape, type(self).__name__, self.eps,
                                                         centre=self.centre, eps_mode=self.eps_mode, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x)

    def extra_repr(self) -> str:
        witness = self._buffers.get(OUTPUT_DTYPE_BUFFER)
        in_gain_dtype = f", output in the replaced gain's dtype ({witness.dtype})" if witness is not None else ""
        return f"{self.normalized_shape}, eps={self.eps}, eps_mode={self.eps_mode!r}{in_gain_dtype}"


def _refuse_peft_ln_tuning(module: nn.Module, name: str, submodule):
    """Stop PEFT's LN tuning from wrapping one of these norms, with a reason (else: StopIteration).

    A global module-registration hook, because PEFT never calls into the norm it wraps; it acts
    only when a ``peft`` ``LNTuningLayer`` takes a norm of this module as its ``base_layer``,
    before PEFT has replaced anything in the model.
    """
    if (isinstance(submodule, _ParameterFreeNorm) and type(module).__name__ == "LNTuningLayer"
            and type(module).__module__.startswith("peft.")):
        raise TypeError(
            f"PEFT LN tuning (LNTuningConfig) trains the gain and bias of a model's norms, but this model's "
            f"norms were replaced by hf_adanorm's {type(submodule).__name__}, which has no parameters to tune "
            f"(the norms of Xu et al. 2019 drop the gain and bias). Tune other modules instead (e.g. "
            f"peft.LoraConfig(target_modules=[...]) on the attention and MLP projections), or call "
            f"hf_adanorm.unpatch_model(model) first to LN-tune the original LayerNorms.")
    return None


torch.nn.modules.module.register_module_module_registration_hook(_refuse_peft_ln_tuning)


class LayerNormSimple(_ParameterFreeNorm):
    """LayerNorm without gain and bias: ``z = (x - mean(x)) / sigma``.

    Gradients flow through both ``mean`` and ``sigma``, which is where the
    paper locates LayerNorm's benefit (re-centring and re-scaling gradients).
    """


class AdaNorm(_ParameterFreeNorm):
    """AdaNorm: ``z = C * (1 - k * y) * y`` with ``y = (x - mean(x)) / sigma``.

    The factor ``phi(y) = C * (1 - k * y)`` is detached in backward, so with
    ``g' = phi(y) * dL/dz``::

        dL/dx = (1 / sigma) * (g' - mean(g') - y * mean(g' * y))

    ``k = 0.1`` is the paper's choice (it keeps ``phi > 0`` for ``|y| < 10``);
    ``C`` is a hyper-parameter scaling the output.
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, k: float = 0.1,
                 C: float = 1.0, eps_mode: str = "torch"):
        check_ada_params(k, C)
        super().__init__(normalized_shape, eps, eps_mode)
        self.k, self.C = float(k), float(C)

    def forward(self, x):
        return self._normalize(x, k=self.k, C=self.C)

    def extra_repr(self):
        return f"{super().extra_repr()}, k={self.k}, C={self.C}"


class DetachNorm(_ParameterFreeNorm):
    """LayerNorm-simple whose statistics are detached in backward (paper, Table 2).

    ``detach="mean"``: ``dL/dx = (g - y * mean(g * y)) / sigma`` (no re-centring);
    ``detach="variance"``: ``dL/dx = (g - mean(g)) / sigma`` (no re-scaling);
    ``detach="both"``: ``dL/dx = g / sigma``.  The forward equals LayerNormSimple.
    """

    def __init__(self, normalized_shape: ShapeLike, eps: float = 1e-5, detach: str = "both",
                 eps_mode: str = "torch"):
        check_detach(detach)
        super().__init__(normalized_shape, eps, eps_mode)
        self.detach = detach

    def forward(self, x):
        return self._normalize(x, detach_mean=self.detach in ("mean", "both"),
                               detach_scale=self.detach in ("variance", "both"))

    def extra_repr(self):
        return f"{super().extra_repr()}, detach={self.detach!r}"


class NoNorm(_ParameterFreeNorm):
    """The identity, ``z = x``: the paper's "w/o Norm" baseline."""

    def forward(self, x):
        return in_witness_dtype(self, x)


class RMSNormSimple(_ParameterFreeNorm):
    """RMSNorm without gain: ``z = x / sqrt(mean(x**2) + eps)``."""

    centre = False


class RMSAdaNorm(AdaNorm):
    """AdaNorm over RMS-normalized ``y = x / rms(x)``: ``z = C * (1 - k * y) * y``.

    With ``g' = C * (1 - k * y) * dL/dz``: ``dL/dx = (g' - y * mean(g' * y)) / rms``.
    """

    centre = False


class RMSDetachNorm(DetachNorm):
    """RMSNorm-simple with ``rms`` detached when ``detach`` is "variance" or "both".

    There is no mean in an RMS norm, so ``detach="mean"`` changes nothing.
    """

    centre = False

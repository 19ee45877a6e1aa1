"""Registry of the norm names ``patch_model`` accepts.

Each name maps to a :class:`NormSpec`: the module that replaces a LayerNorm, the
one that replaces an RMSNorm (when the caller opts in), which :class:`NormConfig`
fields it takes, and one line on what the swap does.  New methods are added with
:func:`register_norm` rather than another branch in the patcher.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import norms
from .portable import output_dtype_witness


@dataclass(frozen=True)
class NormSpec:
    name: str
    layer_cls: Callable[..., nn.Module]
    rms_cls: Callable[..., nn.Module]
    options: tuple[str, ...]  # NormConfig fields passed to the constructors
    effect: str  # what replacing a pretrained norm does to the function


NORM_REGISTRY: dict[str, NormSpec] = {}


def register_norm(name: str, layer_cls, rms_cls, options=(), effect: str = "") -> NormSpec:
    """Make ``name`` usable in ``patch_model(model, name)``.

    ``layer_cls(normalized_shape, eps=..., eps_mode=..., **options)`` replaces
    LayerNorms and ``rms_cls(...)`` RMSNorms; ``options`` names the
    :class:`~hf_adanorm.NormConfig` fields forwarded to them. Where a replaced norm casts
    its output to its half gain's dtype (T5's), the replacement's
    ``output_in_dtype_of(witness)`` is called with a 0-element tensor of the gain's dtype
    (hf_adanorm's own norms have it); without it, a warning.
    """
    if name in NORM_REGISTRY:
        raise ValueError(f"a norm named {name!r} is already registered")
    spec = NormSpec(name, layer_cls, rms_cls, tuple(options), effect)
    NORM_REGISTRY[name] = spec
    return spec


def available_norms() -> list[str]:
    """The names ``patch_model`` accepts."""
    return sorted(NORM_REGISTRY)


def get_spec(name: str) -> NormSpec:
    try:
        return NORM_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown norm {name!r}; choose one of {available_norms()}"
        ) from None


def build_norm(config, kind: str, normalized_shape, eps: float) -> nn.Module:
    """The replacement for a norm of ``kind`` ("layernorm" or "rmsnorm")."""
    spec = get_spec(config.norm)
    cls = spec.layer_cls if kind == "layernorm" else spec.rms_cls
    kwargs = {opt: getattr(config, opt) for opt in spec.options}
    if cls is norms.NoNorm:
        return cls(normalized_shape, eps=eps)
    return cls(normalized_shape, eps=eps, eps_mode=config.eps_mode, **kwargs)


def keep_output_dtype(new: nn.Module, original: nn.Module, info) -> bool:
    """Give ``new`` the output dtype rule of the norm it replaces (see ``portable.output_dtype_witness``),
    through its ``output_in_dtype_of(witness)``. False where it needs the rule and has no such method (a
    norm added with :func:`register_norm`): pass those to :func:`warn_output_dtype`."""
    witness = output_dtype_witness(original, info)
    if witness is None:
        return True
    if not callable(getattr(new, "output_in_dtype_of", None)):
        return False
    new.output_in_dtype_of(witness)
    return True


def warn_output_dtype(unfollowed: dict, stacklevel: int = 3) -> None:
    """One warning for the norms ({name: replacement}) that could not take the output dtype rule."""
    if unfollowed:
        names, classes = list(unfollowed), sorted({type(m).__name__ for m in unfollowed.values()})
        warnings.warn(
            f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)} norms) cast their output to "
            f"their gain's dtype when that is float16 or bfloat16 (T5's norms do), and {', '.join(classes)} has no "
            "output_in_dtype_of(witness) method to do the same: in a half model the next layer may get float32 "
            "and fail. Give the registered class that method (see hf_adanorm.norms), or keep the model in float32",
            UserWarning, stacklevel=stacklevel)


register_norm(
    "layernorm_simple", norms.LayerNormSimple, norms.RMSNormSimple,
    effect="drops the gain and bias: z = (x - mean) / sigma",
)
register_norm(
    "adanorm", norms.AdaNorm, norms.RMSAdaNorm, options=("k", "C"),
    effect="drops the gain and bias and rescales by C(1 - k y): z = C(1 - k y) y",
)
register_norm(
    "detachnorm", norms.DetachNorm, norms.RMSDetachNorm, options=("detach",),
    effect="drops the gain and bias (forward as layernorm_simple); detaches statistics in backward",
)
register_norm(
    "no_norm", norms.NoNorm, norms.NoNorm,
    effect="removes the normalization entirely: z = x",
)

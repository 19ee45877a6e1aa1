"""``NormConfig``: every option of ``patch_model``, validated before the model is touched."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

from .norms import NoNorm, _is_real, check_ada_params, check_detach, check_eps_mode
from .registry import get_spec

Patterns = Optional[Union[str, list[str]]]


def _check_patterns(option: str, patterns) -> None:
    """A regex string that compiles, or a list of module names / suffixes."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"{option}={patterns!r} is not a valid regular expression ({err}); "
                             "pass a list of module names to match names literally") from None
    elif not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)):
        raise TypeError(f"{option} must be a regex string or a list of module names/suffixes, "
                        f"got {patterns!r}")


@dataclass
class NormConfig:
    """What to put in place of a model's LayerNorms.

    The field help below is the documentation of each ``patch_model`` option.
    """

    norm: str = field(default="adanorm", metadata={"help": (
        "Which norm replaces each LayerNorm: 'layernorm_simple' (z = y), 'adanorm' "
        "(z = C(1 - k y) y, factor detached), 'detachnorm' (z = y, statistics detached in "
        "backward, see `detach`) or 'no_norm' (z = x). See `hf_adanorm.available_norms()`.")})
    k: float = field(default=0.1, metadata={"help": (
        "AdaNorm's k in C(1 - k y); must be > 0. The paper uses 1/10, which keeps the "
        "factor positive for |y| < 10.")})
    C: float = field(default=1.0, metadata={"help": "AdaNorm's output scale C; must be > 0."})
    detach: str = field(default="both", metadata={"help": (
        "DetachNorm only: detach the 'mean', the 'variance' or 'both' in backward.")})
    eps: Optional[float] = field(default=None, metadata={"help": (
        "The epsilon of the new norms. None keeps each replaced module's own eps.")})
    eps_mode: str = field(default="torch", metadata={"help": (
        "'torch': sigma = sqrt(population var + eps), as nn.LayerNorm. 'fairseq': "
        "sigma = unbiased std + eps, exactly as the paper's released code (RMS norms: rms + eps).")})
    include_rmsnorm: bool = field(default=False, metadata={"help": (
        "Also replace RMSNorm modules (Llama, Qwen, Mistral, Gemma, T5 ...) by the RMS "
        "counterpart (y = x / rms(x)). Off by default: the paper studies LayerNorm.")})
    include: Patterns = field(default=None, metadata={"help": (
        "Only replace these modules. A string is a regex matched against the full "
        "module name; a list holds exact names or name suffixes (PEFT-style).")})
    exclude: Patterns = field(default=None, metadata={"help": (
        "Never replace these modules (same matching as `include`).")})
    fold_affine: bool = field(default=False, metadata={"help": (
        "Keep each pretrained norm's gain and bias by folding them exactly into the Linear "
        "layers its output feeds (W' = W diag(gain), b' = b + W bias), so a layernorm_simple "
        "patch preserves the model's function. Norms whose output also reaches a residual "
        "connection (post-LN) are reported 'not foldable' with their measured drift. "
        "See docs/checkpoints.md.")})
    exact_unfold: bool = field(default=False, metadata={"help": (
        "fold_affine only: keep the folded Linear layers' original weights, in CPU memory (never "
        "on an accelerator), so that unpatch_model restores them bitwise. Off by default: the copy "
        "costs as much memory as those layers (65% of a Llama-shaped model), and without it "
        "unpatch_model of a folded model refuses (reload the original model instead).")})

    def __post_init__(self):
        spec = get_spec(self.norm)  # unknown names raise with the list of choices
        unused = [name for name in unused_options(self.norm) if getattr(self, name) != _DEFAULTS[name]]
        if unused:
            raise ValueError(
                f"norm {self.norm!r} does not use {', '.join(f'{n}={getattr(self, n)!r}' for n in unused)}; "
                f"drop {'it' if len(unused) == 1 else 'them'} (they would be recorded but change nothing)")
        if "k" in spec.options or "C" in spec.options:
            check_ada_params(self.k, self.C)
        check_detach(self.detach)
        check_eps_mode(self.eps_mode)
        if self.exact_unfold is True and self.fold_affine is not True:
            raise ValueError("exact_unfold=True only applies with fold_affine=True")
        for flag in ("include_rmsnorm", "fold_affine", "exact_unfold"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for option in ("include", "exclude"):
            patterns = getattr(self, option)
            _check_patterns(option, patterns)
            if patterns is not None and not isinstance(patterns, str):
                setattr(self, option, list(patterns))  # a tuple would not survive a JSON round trip
        if self.eps is not None and not (_is_real(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, or None (keep each module's own), "
                             f"got {self.eps!r}")

    def saturation_warning(self, largest_size: Optional[int] = None) -> Optional[str]:
        """A sentence when AdaNorm's k makes ``k |y| >= 1`` (factor 1 - k y <= 0) common.

        The paper picks k so that this is rare (k = 0.1: |y| >= 10).  The share is estimated
        for Gaussian y.  A row of D elements normalized to unit variance has |y| <= sqrt(D),
        so with ``largest_size`` D and k sqrt(D) < 1 it never happens.
        """
        if "k" not in get_spec(self.norm).options:
            return None
        if largest_size is not None and self.k * math.sqrt(largest_size) < 1:
            return None
        share = math.erfc(1.0 / (self.k * math.sqrt(2.0)))
        if share <= _SATURATION_WARN_SHARE:
            return None
        return (f"k={self.k:g} makes k*|y| >= 1 common: for Gaussian y about {share:.1%} of elements "
                "get a factor C(1 - k y) <= 0, which flips their sign. The paper uses k = 0.1; "
                "k <= 0.38 keeps this under 1%.")

    def to_dict(self) -> dict:
        """Every field as JSON (those the norm does not use hold their defaults: checked above)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NormConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown NormConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_options(cls, norm, options: dict) -> "NormConfig":
        """Build from ``patch_model``'s arguments, naming any misspelt option."""
        if isinstance(norm, cls):
            if options:
                raise TypeError("pass either a NormConfig or keyword options, not both")
            return norm
        if not isinstance(norm, str):
            raise TypeError(f"norm must be a name or a NormConfig, got {type(norm).__name__}")
        known = {f.name for f in fields(cls)} - {"norm"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown patch_model option(s) {sorted(unknown)}; valid: {sorted(known)}")
        get_spec(norm)  # an unknown norm first, with the list of choices
        unused = sorted(set(options) & set(unused_options(norm)))
        if unused:  # even at their default values: the caller believes they do something
            raise ValueError(f"norm {norm!r} does not use the option(s) {unused}; drop them")
        return cls(norm=norm, **options)


# The options that only some norms use (the others are meaningful for every replacement).
_NORM_SPECIFIC = ("k", "C", "detach")
_SATURATION_WARN_SHARE = 0.01  # warn when more than 1% of elements have k|y| >= 1
_DEFAULTS = {f.name: f.default for f in fields(NormConfig)}


def unused_options(norm: str) -> tuple[str, ...]:
    """The NormConfig fields that ``norm`` ignores."""
    spec = get_spec(norm)
    unused = [name for name in _NORM_SPECIFIC if name not in spec.options]
    if spec.layer_cls is NoNorm:  # z = x: no eps, no eps mode
        unused += ["eps", "eps_mode"]
    return tuple(unused)

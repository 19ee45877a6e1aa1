"""``NormConfig``: every option of ``patch_model``, validated before the model is touched."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

from .norms import check_ada_params, check_detach, check_eps_mode
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
        "sigma = unbiased std + eps, exactly as the paper's released code.")})
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

    def __post_init__(self):
        spec = get_spec(self.norm)  # unknown names raise with the list of choices
        if "k" in spec.options or "C" in spec.options:
            check_ada_params(self.k, self.C)
        check_detach(self.detach)
        check_eps_mode(self.eps_mode)
        for option in ("include", "exclude"):
            patterns = getattr(self, option)
            _check_patterns(option, patterns)
            if patterns is not None and not isinstance(patterns, str):
                setattr(self, option, list(patterns))  # a tuple would not survive a JSON round trip
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"eps must be > 0 or None (keep each module's), got {self.eps!r}")

    def to_dict(self) -> dict:
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
        return cls(norm=norm, **options)

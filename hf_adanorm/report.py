"""``PatchReport``: what ``patch_model`` replaced, what it left alone and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ModuleEntry:
    name: str
    class_name: str
    kind: Optional[str]  # "layernorm", "rmsnorm" or None (not a last-dim norm)
    action: str  # "replaced", "would replace" (dry run) or "skipped"
    reason: str = ""  # why skipped, or what the swap drops
    replacement: Optional[str] = None


@dataclass
class PatchReport:
    """Every norm-like module ``patch_model`` saw, and what it did with it."""

    norm: str
    entries: list[ModuleEntry] = field(default_factory=list)
    dry_run: bool = False
    effect: str = ""  # what the swap does to a pretrained model's function
    output_drift: Optional[float] = None  # fold_affine: ||f' - f|| / ||f|| on a probe batch, largest over outputs

    @property
    def replaced(self) -> list[ModuleEntry]:
        return [e for e in self.entries if e.action in ("replaced", "would replace")]

    @property
    def skipped(self) -> list[ModuleEntry]:
        return [e for e in self.entries if e.action == "skipped"]

    def to_dict(self) -> dict:
        return {"norm": self.norm, "dry_run": self.dry_run, "effect": self.effect,
                "output_drift": self.output_drift, "entries": [asdict(e) for e in self.entries]}

    def __str__(self) -> str:
        verb = "would replace" if self.dry_run else "replaced"
        lines = [f"hf_adanorm: {verb} {len(self.replaced)} module(s) with {self.norm!r}, "
                 f"skipped {len(self.skipped)}"]
        if self.effect:
            lines.append(f"  effect on a pretrained model: {self.effect}")
        if self.output_drift is not None:
            lines.append(f"  model output drift on a probe batch (relative L2): {self.output_drift:.3g}")
        width = max((len(e.name) for e in self.entries), default=0)
        for e in self.entries:
            tail = f"-> {e.replacement}" if e.replacement else ""
            lines.append(f"  {e.action:<13} {e.name:<{width}}  {e.class_name} ({e.kind or '-'}) "
                         f"{tail} {e.reason}".rstrip())
        return "\n".join(lines)

    __repr__ = __str__

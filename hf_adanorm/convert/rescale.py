"""A close starting point for post-LN norms, which no exact fold can remove.

A post-LN norm n (BERT, RoBERTa, BART) hands z = γ ⊙ y + β to two places: Linear layers
that read it (the next attention's Q, K, V or the FFN's first layer) and the residual
stream, where the next sublayer's output projection W adds to it before the next norm:

    u = z + W·h + b          next norm: LN(u) = γ' ⊙ (u − mean(u)) / σ(u) + β'

After the swap the norm outputs s = c·y instead (c = 1 for LayerNorm-simple; for AdaNorm
c = C, since C(1 − k y) y ≈ C y where k|y| is small). Two changes to the student's Linear
layers make it the teacher wherever γ is a constant g:

- every Linear that reads z gets γ / c on its input columns and W·β in its bias, so it
  computes exactly what it computed before (an exact fold of the input side);
- the residual writer W, b becomes (c/g)·W, (c/g)·(b + β), so that u_student = (c/g)·u
  − (c/g)·(γ − g) ⊙ y: the teacher's u up to a scale, which the next norm removes, plus
  an error that vanishes where γ = g.

g is the mean of γ weighted by E[y²] of each feature over the probe batch's tokens, padding left
out (features with large activations count more). The rest, the spread of γ around g, is left to
the distillation.
Measured on MiniLM → LayerNorm-simple: pooled-embedding cosine 0.07 after the naive swap,
0.49 after this start, 0.958 after 150 distillation steps against 0.898 from the naive swap
(docs/conversion.md).

Which Linear reads z and which one writes into the next norm's input is found by a forward
pass with hooks on the teacher: a reader's input is z itself (dropout is off), and a writer's
output o satisfies x' = z + o at some later norm's input x'. A norm for which either is
missing or ambiguous, or whose Linear has no bias where one is needed, is left to the schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..fold_trace import primary_output, relative_drift
from .schedule import PlainNormalization

MATCH_TOLERANCE = 1e-4  # relative: |x' − z − o| ≤ tolerance · max|x'| identifies the writer (float32)
EXACT_TOLERANCE = 1e-3  # relative output error of a site's exactness check (eps moves it by ~1e-6)
RESCALABLE = ("layernorm_simple", "adanorm", "detachnorm")  # norms whose output is about c·y


@dataclass
class Site:
    """What a post-LN norm feeds: the Linear layers reading its output and the residual writer."""
    readers: list[str]
    writer: str
    next_norm: str
    gain: float = 0.0  # g, set from the probe


def output_scale(norm_config) -> float:
    """c of the module docstring: what the new norm's output is, roughly, a multiple of y."""
    return float(norm_config.C) if norm_config.norm == "adanorm" else 1.0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b))


class _Projection:
    """Each token's vector projected on one fixed random direction v, in float64, cached per tensor.
    Matching every norm's residual against every Linear's output compares one number per token
    instead of whole vectors: ``find_sites`` took 10 s on a 24-layer BERT-base without it."""

    def __init__(self):
        self.directions, self.cache = {}, {}

    @staticmethod
    def _direction(width: int) -> torch.Tensor:
        return torch.randn(width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)

    def norm1(self, width: int) -> float:
        """‖v‖₁ of the direction for vectors of ``width``."""
        return float(self._direction(width).abs().sum())

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self.cache:  # (the hook stores hold every tensor, so no id is reused meanwhile)
            width = t.shape[-1]
            if (width, t.device) not in self.directions:
                self.directions[width, t.device] = self._direction(width).to(t.device)
            self.cache[key] = t.double() @ self.directions[width, t.device]
        return self.cache[key]


def _positions_of_the_mask(model: nn.Module) -> str | None:
    """The prefix of the module names whose norms run over the attention mask's positions: every
    module, or an encoder-decoder's encoder only (its decoder runs over shifted decoder inputs,
    which the mask does not describe even when the lengths agree); None if that encoder is not found."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    return next((f"{name}." for name, module in model.named_modules() if module is encoder and name), None)


@torch.no_grad()
def find_sites(teacher: nn.Module, names: list[str], batch: dict) -> dict[str, Site]:
    """Run ``teacher`` once on ``batch`` and return a :class:`Site` for each norm in ``names``
    (LayerNorms with a gain) whose readers and residual writer are identified unambiguously."""
    norms = {name: m for name, m in teacher.named_modules() if isinstance(m, nn.LayerNorm)}
    linears = {name: m for name, m in teacher.named_modules() if type(m) is nn.Linear}
    seen_norm, seen_linear, hooks = {}, {}, []

    def keep(store, name):
        def hook(_module, args, out):
            store[name] = (args[0], out)
        return hook

    for name, module in norms.items():
        hooks.append(module.register_forward_hook(keep(seen_norm, name)))
    for name, module in linears.items():
        hooks.append(module.register_forward_hook(keep(seen_linear, name)))
    try:
        teacher(**batch)
    finally:
        for hook in hooks:
            hook.remove()

    order = list(seen_norm)  # execution order
    mask = batch.get("attention_mask")
    masked = _positions_of_the_mask(teacher)
    projection = _Projection()
    sites = {}
    for name in names:
        module = norms.get(name)
        if (module is None or name not in seen_norm or module.weight is None or module.bias is None
                or len(module.normalized_shape) != 1):
            continue
        x, z = seen_norm[name]
        readers = [n for n, (inp, _) in seen_linear.items() if _same(inp, z)]
        later = order[order.index(name) + 1:]
        matches = []
        for nxt in later:
            x_next = seen_norm[nxt][0]
            if x_next.shape != z.shape:
                continue
            tolerance = MATCH_TOLERANCE * x_next.abs().max().clamp_min(1e-12)
            # |x' − z − o| ≤ tolerance everywhere implies |P(x') − P(z) − P(o)| ≤ tolerance·‖v‖₁ for
            # each token: test that first (one number per token), then the whole tensors
            projected = projection(x_next) - projection(z)
            bound = float(tolerance) * projection.norm1(z.shape[-1])
            matches += [(w, nxt) for w, (_, o) in seen_linear.items()
                        if o.shape == z.shape and (projected - projection(o)).abs().max() <= bound
                        and (x_next - z - o).abs().max() <= tolerance]
        if not readers or len(matches) != 1:
            continue
        writer, next_norm = matches[0]
        if writer in readers or linears[writer].bias is None or any(linears[r].bias is None for r in readers):
            continue
        y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=module.eps)
        if mask is not None and masked is not None and name.startswith(masked) and mask.shape == y.shape[:-1]:
            y = y[mask.bool()]  # padding is not text: it stays out of E[y²]
        weights = y.pow(2).reshape(-1, y.shape[-1]).mean(0)
        gain = float((module.weight.float() * weights).sum() / weights.sum())
        if gain <= 0:
            continue
        sites[name] = Site(readers, writer, next_norm, gain)
    # A Linear changed by two sites would need their changes composed: leave both to the schedule.
    owner: dict[str, str] = {}
    for name, site in list(sites.items()):
        for linear in site.readers + [site.writer]:
            if linear in owner:
                sites.pop(name, None)
                sites.pop(owner[linear], None)
            owner[linear] = name
    return sites


@torch.no_grad()
def verified_sites(teacher: nn.Module, names: list[str], batch: dict) -> dict[str, Site]:
    """:func:`find_sites` on a float32 copy of ``teacher``, keeping only the sites that pass
    :func:`_exact_when_constant`: a reader the hooks cannot see (a convolution, a functional call,
    a Linear called again on other input, a tied weight) makes that check fail."""
    probe = copy.deepcopy(teacher).float().eval()
    batch = {k: v.to(next(probe.parameters()).device) for k, v in batch.items()}
    return {name: site for name, site in find_sites(probe, names, batch).items()
            if _exact_when_constant(probe, name, site, batch)}


@torch.no_grad()
def _exact_when_constant(probe: nn.Module, name: str, site: Site, batch: dict) -> bool:
    """With this norm's γ set to the constant g, rescaling the site and replacing the norm by the
    plain normalization must leave the model's output unchanged (the next norm removes the scale)."""
    norm = probe.get_submodule(name)
    gamma = norm.weight.detach().clone()
    parent_name, _, attr = name.rpartition(".")
    parent = probe.get_submodule(parent_name)
    norm.weight.fill_(site.gain)
    saved = None
    try:
        reference = primary_output(probe(**batch))
        saved = apply_sites(probe, probe.get_submodule, {name: site}, scale=1.0)
        setattr(parent, attr, PlainNormalization(norm.eps))
        error = relative_drift(primary_output(probe(**batch)), reference)
    finally:
        setattr(parent, attr, norm)
        if saved is not None:
            restore(probe, saved)
        norm.weight.copy_(gamma)
    return error < EXACT_TOLERANCE


@torch.no_grad()
def apply_sites(student: nn.Module, original_norm: Callable[[str], nn.Module], sites: dict[str, Site],
                scale: float) -> dict:
    """Change ``student``'s Linear layers for each site (see the module docstring), with γ and β of
    ``original_norm(name)``, the norm the site had in the original model; returns the original
    tensors, for :func:`restore`."""
    saved = {}
    for name, site in sites.items():
        norm = original_norm(name)
        gamma, beta = norm.weight.detach(), norm.bias.detach()
        for reader in site.readers:
            linear = student.get_submodule(reader)
            saved.setdefault(reader, (linear.weight.clone(), linear.bias.clone()))
            linear.bias += (linear.weight.float() @ beta.float()).to(linear.bias.dtype)
            linear.weight *= (gamma / scale).to(linear.weight.dtype)
        linear = student.get_submodule(site.writer)
        saved.setdefault(site.writer, (linear.weight.clone(), linear.bias.clone()))
        factor = scale / site.gain
        linear.weight *= factor
        linear.bias.add_(beta.to(linear.bias.dtype)).mul_(factor)
    return saved


@torch.no_grad()
def restore(student: nn.Module, saved: dict) -> None:
    for name, (weight, bias) in saved.items():
        linear = student.get_submodule(name)
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


class NormTargets:
    """A per-norm distillation target for the rescaled norms: the student's norm output s, mapped back
    through the teacher's gain and bias, should match the teacher's output z of the same norm,

        loss = mean over norms n of  mean over tokens of  1 − cos(γ_n ⊙ s_n / c + β_n, z_n),

    so every layer gets its own signal instead of only the last one's (measured: docs/conversion.md).
    Forward hooks keep the latest outputs of both models; :meth:`loss` reads them after a step's
    forward passes."""

    def __init__(self, teacher: nn.Module, student: nn.Module, names: list[str], scale: float):
        self.scale, self.names = scale, list(names)
        self.student_out, self.teacher_out, self.hooks = {}, {}, []
        for name in self.names:
            norm = teacher.get_submodule(name)
            self.hooks.append(student.get_submodule(name).register_forward_hook(self._keep(self.student_out, name)))
            self.hooks.append(norm.register_forward_hook(self._keep(self.teacher_out, name)))
        self.affine = {n: (teacher.get_submodule(n).weight.detach(), teacher.get_submodule(n).bias.detach())
                       for n in self.names}

    @staticmethod
    def _keep(store, name):
        def hook(_module, _args, out):
            store[name] = out
        return hook

    def loss(self, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.bool()
        total = 0.0
        for name in self.names:
            gamma, beta = self.affine[name]
            mapped = self.student_out[name].float() * (gamma.float() / self.scale) + beta.float()
            cosine = torch.nn.functional.cosine_similarity(mapped, self.teacher_out[name].float(), dim=-1)
            total = total + (1 - cosine)[keep].mean()
        return total / len(self.names)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.student_out.clear()
        self.teacher_out.clear()

"""Measure, on the live backward pass, what each norm does to the gradient.

Xu et al. (2019, Theorem 1) locate LayerNorm's benefit in its backward pass.  For
one row (token) with hidden size ``D``, input ``x``, output ``z`` and upstream
gradient ``g = dL/dz``, LayerNorm-simple ``z = y = (x - mu) / sigma`` gives::

    dL/dx = (1 / sigma) * (g - mean(g) - y * mean(g * y))

so the derivative of ``mu`` *re-centres* the gradient (``mean(dL/dx) = 0``) and
that of ``sigma`` *re-scales* it (``var(dL/dx) <= var(g) / sigma**2``).  For every
norm, :class:`GradientProbe` records per row ``mean`` and ``var`` (population)
over the hidden dimension of ``g`` and of ``dL/dx`` (the gradient that flows to
``x`` *through the norm only*, not through a residual branch that also reads
``x``), and reports, averaged over the rows that received a gradient (rows with
``g == 0``, e.g. padding, are skipped)::

    grad_out_mean = avg |mean(g)|         grad_out_var = avg var(g)
    grad_in_mean  = avg |mean(dL/dx)|     grad_in_var  = avg var(dL/dx)
    recentring = sum(sigma * |mean(dL/dx)|) / sum(|mean(g)|)
    rescaling  = sum(sigma**2 * var(dL/dx)) / sum(var(g))

The factors ``sigma`` make both ratios scale-free: ``recentring`` is 0 when the
mean's derivative re-centres (LayerNorm, LayerNorm-simple, AdaNorm) and exactly 1
when the mean is detached (``DetachNorm(detach="mean")``) or absent (``NoNorm``,
where ``sigma = 1``); ``rescaling <= 1`` for LayerNorm-simple and is exactly 1
with the variance detached.  ``sigma`` is the norm's own scale:
``sqrt(var(x) + eps)``, or ``std_unbiased(x) + eps`` for ``eps_mode="fairseq"``,
with the uncentred ``mean(x**2)`` for RMS norms.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .blend import blends_of, inside
from .detect import classify
from .norms import NoNorm
from .patch import get_patch_record
from .wrappers import inner_model

STATISTICS = ("grad_out_mean", "grad_out_var", "grad_in_mean", "grad_in_var", "recentring", "rescaling")


@dataclass(frozen=True)
class NormSite:
    """A norm to measure and how to recompute its scale ``sigma`` from its input."""

    name: str
    module: nn.Module
    centre: bool  # subtracts the mean (LayerNorm family) rather than not (RMS family)
    eps: float
    fairseq: bool  # sigma = unbiased std + eps instead of sqrt(var + eps)
    identity: bool = False  # NoNorm: z = x, sigma = 1


def find_norm_sites(model: nn.Module) -> list[NormSite]:
    """Every norm of ``model``: the hf_adanorm replacements and the original norms left in place. Of a
    norm being blended in, the new one (the module that stays once the ramp ends; not the frozen original).
    Of a PEFT ``PeftModel``, those of the model inside it, under that model's names (as its patch record)."""
    model = inner_model(model)
    record = get_patch_record(model)
    patched = set(record["modules"]) if record else set()
    blends = blends_of(model)
    sites = []
    for name, module in model.named_modules():
        if inside(name, blends):
            continue
        module = blends[name].target if name in blends else module
        if name in patched:
            if isinstance(module, NoNorm):
                sites.append(NormSite(name, module, False, 0.0, False, identity=True))
            else:
                sites.append(NormSite(name, module, module.centre, module.eps, module.eps_mode == "fairseq"))
        elif name:
            info, _ = classify(module)
            if info is not None:
                sites.append(NormSite(name, module, info.kind == "layernorm", info.eps, False))
    return sites


def row_sigma(x2d: torch.Tensor, site: NormSite) -> torch.Tensor:
    """The per-row scale ``sigma`` that ``site`` divides by (see the module docstring)."""
    if site.identity:
        return x2d.new_ones(x2d.shape[0])
    xc = x2d - x2d.mean(-1, keepdim=True) if site.centre else x2d
    if site.fairseq:
        dof = max(x2d.shape[-1] - (1 if site.centre else 0), 1)
        return (xc.pow(2).sum(-1) / dof).sqrt() + site.eps
    return (xc.pow(2).mean(-1) + site.eps).sqrt()


@functools.lru_cache(maxsize=None)
def _input_name(module_type: type) -> str:
    """The keyword of ``module_type.forward``'s input (``input``, ``hidden_states``, ``x`` ...)."""
    return list(inspect.signature(module_type.forward).parameters)[1]  # [0] is self


class _Call:
    """One forward call of one norm: waits for both of its gradients, then reports them."""

    __slots__ = ("probe", "name", "sigma", "grads")

    def __init__(self, probe: "GradientProbe", name: str, sigma: torch.Tensor):
        self.probe, self.name, self.sigma, self.grads = probe, name, sigma, {}

    def receive(self, which: str, grad: torch.Tensor) -> None:
        # For NoNorm the output *is* the input alias, so the two hooks may fire in either order.
        self.grads[which] = grad.detach()
        if len(self.grads) == 2:
            self.probe._accumulate(self.name, self.sigma, self.grads.pop("out"), self.grads.pop("in"))


class GradientProbe:
    """Temporary hooks on a set of norms that accumulate the statistics of the module docstring.

    :meth:`attach` adds one forward pre-hook and one forward hook per norm; every
    forward call then routes the norm's input through an alias ``x.view_as(x)``
    that only the norm reads, so a tensor hook on it sees exactly the norm's
    share of ``dL/dx``.  :meth:`detach` removes every hook; nothing stays behind.
    """

    def __init__(self, sites: list[NormSite]):
        self.sites = sites
        self._handles = []
        self._pending: dict[str, _Call] = {}
        self._sums: dict[str, torch.Tensor] = {}

    @property
    def num_hooks(self) -> int:
        return len(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        for site in self.sites:
            self._handles.append(site.module.register_forward_pre_hook(functools.partial(self._before, site),
                                                                       with_kwargs=True))
            self._handles.append(site.module.register_forward_hook(functools.partial(self._after, site)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _before(self, site: NormSite, module, args, kwargs):
        # the input comes positionally, or by keyword (``norm(hidden_states=h)``)
        key = None if args else _input_name(type(module))
        x = args[0] if args else kwargs.get(key)
        if not torch.is_tensor(x) or not x.requires_grad or not torch.is_grad_enabled():
            return None
        with torch.no_grad():
            sigma = row_sigma(x.detach().reshape(-1, x.shape[-1]).float(), site)
        call = _Call(self, site.name, sigma)
        alias = x.view_as(x)
        alias.register_hook(functools.partial(call.receive, "in"))
        self._pending[site.name] = call
        if key is None:
            return (alias, *args[1:]), kwargs
        return args, {**kwargs, key: alias}

    def _after(self, site: NormSite, module, args, output):
        call = self._pending.pop(site.name, None)
        if call is not None and torch.is_tensor(output) and output.requires_grad:
            output.register_hook(functools.partial(call.receive, "out"))

    def _accumulate(self, name: str, sigma, grad_out, grad_in) -> None:
        size = grad_out.shape[-1]
        g = grad_out.reshape(-1, size).float()
        dx = grad_in.reshape(-1, size).float()
        has_grad = (g != 0).any(-1)
        g, dx, sigma = g[has_grad], dx[has_grad], sigma[has_grad]
        var_g, mean_g = torch.var_mean(g, dim=-1, correction=0)
        var_dx, mean_dx = torch.var_mean(dx, dim=-1, correction=0)
        sums = torch.stack([
            has_grad.sum().float(), mean_g.abs().sum(), var_g.sum(), mean_dx.abs().sum(), var_dx.sum(),
            (sigma * mean_dx.abs()).sum(), (sigma.pow(2) * var_dx).sum(),
        ]).double()
        self._sums[name] = self._sums[name] + sums if name in self._sums else sums

    def collect(self, loss_scale: float = 1.0) -> dict[str, dict[str, float]]:
        """``{norm name: {statistic: value}}`` for everything since the last collect; then reset.

        ``loss_scale``: the factor the backward pass was multiplied by (fp16's GradScaler), which the
        four absolute statistics are divided back by (means by it, variances by its square); the
        two ratios do not depend on it."""
        results = {}
        for name, sums in self._sums.items():
            rows, out_mean, out_var, in_mean, in_var, in_mean_scaled, in_var_scaled = sums.tolist()
            if rows == 0:
                continue
            mean_unit, var_unit = rows * loss_scale, rows * loss_scale ** 2
            stats = {"grad_out_mean": out_mean / mean_unit, "grad_out_var": out_var / var_unit,
                     "grad_in_mean": in_mean / mean_unit, "grad_in_var": in_var / var_unit}
            for key, num, den in (("recentring", in_mean_scaled, out_mean), ("rescaling", in_var_scaled, out_var)):
                ratio = _ratio(num, den)
                if ratio is not None:
                    stats[key] = ratio
            results[name] = stats
        self._sums.clear()
        return results


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None

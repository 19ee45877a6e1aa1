"""``fold_affine=True``: move a pretrained norm's gain and bias into the Linear layers it feeds.

A LayerNorm (or RMSNorm) computes ``z = s * y + b`` with ``y`` the normalized
input, ``s`` its gain (``w`` or ``1 + w``) and ``b`` its bias (0 for RMSNorm).
When ``z`` is read only by Linear layers ``x -> W x + c``, then

    W z + c = (W diag(s)) y + (c + W b)

so replacing the norm by one that outputs ``y`` (LayerNorm-simple) and the
Linear by ``W' = W diag(s)``, ``c' = c + W b`` computes the same function.
GPT-2's ``Conv1D`` stores ``W`` transposed, ``(in, out)``: ``W' = diag(s) W``,
``c' = c + b W``.  Parallel blocks (one norm feeding attention and MLP) fold into
every consumer; a consumer without a bias (e.g. an LM head after a final LayerNorm)
gets one, ``c' = W b``, listed in the record as ``added_bias`` so loading can
rebuild it; a consumer whose weight is tied to the input embeddings gets its own
copy (and ``config.tie_word_embeddings`` becomes False) so the embeddings are left
alone.

Which norms qualify is decided on the model itself, not from architecture names:

1. one probe forward pass (:mod:`.fold_trace`) finds who reads each norm's output;
   a norm folds only if all reads are Linear/Conv1D inputs (no residual add, no
   dropout, not the model output) and those layers read no other norm;
2. the folds are then checked numerically with ``torch.func.functional_call`` (the
   model is not touched): with random gains and biases in the norms, the output
   with the affine in place must equal the output with it folded.

A norm that fails (post-LN: BERT, BART, OPT-350m) is reported "not foldable" with
its *drift*, ``||z' - z|| / ||z||`` of its own output on the probe batch; the
report and record also give the whole model's output drift (logits, else the last
hidden state) after patching.

The folded Linear layers' original parameters are kept so that ``unpatch_model``
restores the model bitwise; if they were changed since (training), it refuses
rather than silently throwing the changes away.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .fold_trace import (PROBE_SHAPE, eval_no_grad, is_conv1d, is_linear, probe_inputs,
                         relative_drift, run, trace)

_FOLD_ATTR = "_hf_adanorm_fold"


def folded_linear(module: nn.Module, gain: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(W', c')`` for a Linear/Conv1D fed by ``gain * y + bias``; computed in float64.

    ``c'`` is None when the layer has no bias and there is no norm bias to absorb
    (``bias`` None); otherwise a layer without a bias gets ``c' = W bias``.
    """
    w = module.weight.detach().double()
    s = gain.double().to(w.device)
    conv = is_conv1d(module)
    new_w = w * (s[:, None] if conv else s[None, :])
    c = module.bias
    new_c = None if c is None else c.detach().double()
    if bias is not None:
        shift = bias.double().to(w.device) @ w if conv else w @ bias.double().to(w.device)
        new_c = shift if new_c is None else new_c + shift
    dtype = module.weight.dtype
    return new_w.to(dtype), (None if new_c is None else new_c.to(dtype))


@dataclass
class FoldPlan:
    """What ``fold_affine`` will do; built by :func:`plan_fold` without changing the model."""

    chosen: dict  # {norm name: (NormInfo, module)} from the patcher
    folds: dict = field(default_factory=dict)  # {norm name: [consumer names]}
    refused: dict = field(default_factory=dict)  # {norm name: why not foldable}
    drift: dict = field(default_factory=dict)  # {norm name: relative change of its output}
    inputs: dict = field(default_factory=dict)
    reference: Optional[torch.Tensor] = None  # the unpatched model's output on ``inputs``

    def affine(self, name: str):
        """The norm's effective ``(s, b)`` (b None without a bias parameter), detached."""
        info, module = self.chosen[name]
        # float64 before adding the offset: a bf16 1 + w (Gemma) would round w = 0.003 to 1.0
        gain = (getattr(module, info.gain).detach().double() + info.gain_offset if info.gain
                else torch.ones(info.size, dtype=torch.float64))
        bias = getattr(module, info.bias).detach().double() if info.bias else None
        return gain, bias


def _trial_params(plan, model, names, folded) -> dict:
    """functional_call parameters: random affine in every norm of ``names``; those in ``folded``
    get the neutral affine and their random affine moved into their consumers."""
    params = {}
    for name in names:
        info, module = plan.chosen[name]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same draw in every trial
        s = 0.25 + 2.5 * torch.rand(info.size, generator=g, dtype=torch.float64)
        b = torch.randn(info.size, generator=g, dtype=torch.float64) if info.bias else None
        if name in folded:
            s_param, b_param = torch.ones_like(s), None if b is None else torch.zeros_like(b)
            for cname in plan.folds[name]:
                consumer = model.get_submodule(cname)
                new_w, new_c = folded_linear(consumer, s, b)
                params[f"{cname}.weight"] = new_w
                if new_c is not None:
                    params[f"{cname}.bias"] = new_c
        else:
            s_param, b_param = s, b
        if info.gain:
            like = getattr(module, info.gain)
            params[f"{name}.{info.gain}"] = (s_param - info.gain_offset).to(like.device, like.dtype)
        if b_param is not None:
            like = getattr(module, info.bias)
            params[f"{name}.{info.bias}"] = b_param.to(like.device, like.dtype)
    return params


def _tolerance(model) -> float:
    dtype = next(model.parameters()).dtype
    return 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def plan_fold(model: nn.Module, chosen: dict, built: dict) -> FoldPlan:
    """Decide, per norm in ``chosen``, whether its affine folds exactly; changes nothing.

    Raises ``ValueError`` if the model cannot be probed (meta weights, unsupported inputs).
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("fold_affine=True needs the model's weights, but some are on the meta "
                         "device; load the weights first (or patch without fold_affine)")
    plan = FoldPlan(chosen, inputs=probe_inputs(model))
    with eval_no_grad(model):
        traced = trace(model, chosen, built, plan.inputs)
        plan.reference, plan.drift = traced.reference, traced.drift
        owners = {}
        for name, found in traced.consumers.items():
            for cname in found:
                owners.setdefault(cname, []).append(name)
        for name, found in traced.consumers.items():
            why = _refusal(name, found, owners, traced.foreign.get(name, []))
            if why:
                plan.refused[name] = why
            else:
                plan.folds[name] = sorted(found)
        _verify_numerically(plan, model)
    return plan


def _refusal(name, found, owners, foreign) -> Optional[str]:
    if "the model output" in foreign:
        return "its output is the model's output"
    if foreign:
        kinds = ", ".join(sorted(set(foreign)))
        return f"its output is also read by {kinds} (a residual connection or other non-Linear use)"
    others = [f"{c} ({type(m).__name__})" for c, m in found.items() if not is_linear(m)]
    if others:
        return f"its output feeds {', '.join(sorted(others))}, not only Linear layers"
    if not found:
        return "its output reaches no Linear layer"
    shared = sorted({o for c in found for o in owners[c] if o != name})
    if shared:
        return f"its Linear consumers also read the output of {', '.join(shared)}"
    return None


def _verify_numerically(plan: FoldPlan, model) -> None:
    """Keep in ``plan.folds`` only the norms whose fold leaves the output unchanged.

    A safety net behind the graph analysis: one check of all folds together, and
    per norm only if that fails.
    """
    if not plan.folds:
        return
    names, tol = list(plan.chosen), _tolerance(model)
    ref = run(model, plan.inputs, _trial_params(plan, model, names, set()))
    everything = run(model, plan.inputs, _trial_params(plan, model, names, set(plan.folds)))
    if relative_drift(everything, ref) <= tol:
        return
    for name in list(plan.folds):
        out = run(model, plan.inputs, _trial_params(plan, model, names, {name}))
        if relative_drift(out, ref) > tol:
            del plan.folds[name]
            plan.refused[name] = "folding it changes the model's output (numerical check)"


@dataclass
class _FoldState:
    """Enough to undo a fold bitwise: original and folded parameters of each consumer."""

    layers: dict  # {consumer name: (old weight, old bias, new weight, new bias, versions)}
    tie_flags: list  # configs whose tie_word_embeddings was switched off
    untied: list  # consumers that got their own copy of a tied weight
    added_bias: list  # consumers that had no bias and got one


def _shared_params(model) -> set:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def apply_fold(model: nn.Module, plan: FoldPlan) -> _FoldState:
    """Fold every planned norm into its consumers (keeping what :func:`unfold` needs)."""
    shared = _shared_params(model)
    layers, untied, added_bias = {}, [], []
    for name, cnames in plan.folds.items():
        gain, bias = plan.affine(name)
        for cname in cnames:
            layer = model.get_submodule(cname)
            old_w, old_b = layer.weight, layer.bias
            if id(old_w) in shared:
                untied.append(cname)
            new_w, new_c = folded_linear(layer, gain, bias)
            layer.weight = nn.Parameter(new_w, requires_grad=old_w.requires_grad)
            if new_c is not None:
                if old_b is None:
                    added_bias.append(cname)
                layer.bias = nn.Parameter(new_c, requires_grad=old_w.requires_grad if old_b is None
                                          else old_b.requires_grad)
            versions = (layer.weight._version, None if layer.bias is None else layer.bias._version)
            layers[cname] = (old_w, old_b, layer.weight, layer.bias, versions)
    tie_flags = []
    if untied and getattr(model, "config", None) is not None:
        # The consumer has its own weight now: keep save/load from tying it back.
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
                tie_flags.append(cfg)
    state = _FoldState(layers, tie_flags, untied, added_bias)
    object.__setattr__(model, _FOLD_ATTR, state)
    return state


def fold_summary(model: nn.Module, plan: FoldPlan, report, applied: Optional[_FoldState] = None) -> dict:
    """Annotate ``report`` and return the ``fold`` part of the patch record.

    When the fold was ``applied``, also measures the whole patched model's output
    drift on the probe batch.
    """
    by_name = {e.name: e for e in report.entries}
    for name, cnames in plan.folds.items():
        by_name[name].reason = f"affine folded into {', '.join(cnames)} (exact)"
    for name, why in plan.refused.items():
        by_name[name].reason = (f"not foldable: {why}; {by_name[name].reason}; drift of its "
                                f"output on the probe batch: {plan.drift[name]:.3g}")
    summary = {
        "folded": plan.folds,
        "not_foldable": {n: {"reason": plan.refused[n], "drift": plan.drift[n]} for n in plan.refused},
        "probe": f"random token ids {list(PROBE_SHAPE)}" if "input_ids" in plan.inputs else "random images",
    }
    if applied is not None:
        with eval_no_grad(model):
            summary["output_drift"] = relative_drift(run(model, plan.inputs), plan.reference)
        summary["untied"], summary["added_bias"] = applied.untied, applied.added_bias
        report.output_drift = summary["output_drift"]
    return summary


def unfold(model: nn.Module) -> None:
    """Give the folded Linear layers their original parameters back (bitwise), or raise.

    Raises ``RuntimeError`` before changing anything when a folded layer was
    modified since ``patch_model`` (e.g. trained): restoring would discard that.
    """
    state: Optional[_FoldState] = getattr(model, _FOLD_ATTR, None)
    if state is None:
        return
    changed = []
    for cname, (_, _, new_w, new_b, versions) in state.layers.items():
        layer = model.get_submodule(cname)
        now = (layer.weight, layer.bias)
        if now[0] is not new_w or now[1] is not new_b or (
                new_w._version, None if new_b is None else new_b._version) != versions:
            changed.append(cname)
    if changed:
        raise RuntimeError(
            f"cannot unpatch: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} absorbed "
            "the norms' gain and bias (fold_affine=True) and were changed since (training?); "
            "restoring the originals would silently discard those changes. Save the trained model "
            "with hf_adanorm.save_pretrained instead (plain=True gives a stock checkpoint for "
            "layernorm_simple).")
    for cname, (old_w, old_b, _, _, _) in state.layers.items():
        layer = model.get_submodule(cname)
        layer.weight, layer.bias = old_w, old_b  # the very objects (a None bias unregisters it)
    for cfg in state.tie_flags:
        cfg.tie_word_embeddings = True
    object.__setattr__(model, _FOLD_ATTR, None)

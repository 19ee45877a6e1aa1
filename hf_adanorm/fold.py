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

1. one probe forward pass (:mod:`.fold_trace`) finds who reads each norm's output,
   in the graphs of all the model's outputs but its hidden states (a second head
   counts); a norm folds only if all reads are Linear/Conv1D inputs (no residual
   add, no dropout, functional or not, no in-place change, not a model output) and
   those layers read no other norm; a module registered under several names, and a
   norm with no gain or bias, is never folded;
2. the folds are then checked numerically with ``torch.func.functional_call`` (the
   model is not touched): with random gains and biases in the norms, every checked
   output with the affine in place must equal the output with it folded, to the
   round-off of the model's dtype.

A norm that fails (post-LN: BERT, BART, OPT-350m) is reported "not foldable" with
its *drift*, ``||z' - z|| / ||z||`` of its own output on the probe batch; the
report and record also give the whole model's output drift after patching (the
largest over the checked outputs: the logits, else the last hidden state, and
every other head's output).

Memory: by default nothing of the folded layers' originals is kept, so the fold costs
no memory, and ``unpatch_model`` of a folded model refuses (reload the original
instead).  With ``exact_unfold=True`` the original parameter objects are kept, their
data moved to CPU memory (never on an accelerator), and ``unpatch_model`` restores
them bitwise, converted to the model's current dtype and device; it refuses if the
folded layers changed since (training) or the model went through a lossy dtype
round trip (see :mod:`.fold_state`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .fold_trace import (PROBE_SHAPE, eval_no_grad, is_conv1d, is_linear, outputs_drift, probe_inputs,
                         run, trace)


_CHUNK_ELEMENTS = 1 << 22  # float64 work in row blocks: no full float64 copy of a huge LM head


def _weight_chunks(w: torch.Tensor, gain: torch.Tensor, conv: bool):
    """``(rows, W' rows)`` of the folded weight, computed block by block in float64.

    Each element is ``w * s`` rounded once to ``w.dtype`` (the float64 product of two float32
    values is exact), so the result does not depend on the device or the block size.
    """
    s = gain.double().to(w.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        block = w[rows].detach().double()
        yield rows, (block * (s[rows, None] if conv else s[None, :])).to(w.dtype)


def fold_tensors(w: torch.Tensor, c: Optional[torch.Tensor], gain: torch.Tensor,
                 bias: Optional[torch.Tensor], conv: bool):
    """``(W', c')`` for a Linear (``conv``: GPT-2 Conv1D) with weight ``w`` and bias ``c``, fed by
    ``gain * y + bias``.  ``c'`` is None when there is no bias and no norm bias to absorb;
    otherwise a layer without a bias gets ``c' = W bias``.
    """
    new_w = torch.empty_like(w, requires_grad=False)
    shift = None
    if bias is not None:
        b = bias.double().to(w.device)
        shift = torch.zeros(w.shape[1] if conv else w.shape[0], dtype=torch.float64, device=w.device)
    for rows, block in _weight_chunks(w, gain, conv):
        new_w[rows] = block
        if shift is not None:
            original = w[rows].detach().double()
            if conv:
                shift += b[rows] @ original
            else:
                shift[rows] = original @ b
    new_c = None if c is None else c.detach().double()
    if shift is not None:
        new_c = shift if new_c is None else new_c + shift
    return new_w, (None if new_c is None else new_c.to(w.dtype))


def folded_linear(module: nn.Module, gain: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(W', c')`` for a Linear/Conv1D module fed by ``gain * y + bias`` (see :func:`fold_tensors`)."""
    return fold_tensors(module.weight, module.bias, gain, bias, is_conv1d(module))


@dataclass
class FoldPlan:
    """What ``fold_affine`` will do; built by :func:`plan_fold` without changing the model."""

    chosen: dict  # {norm name: (NormInfo, module)} from the patcher
    folds: dict = field(default_factory=dict)  # {norm name: [consumer names]}
    refused: dict = field(default_factory=dict)  # {norm name: why not foldable}
    drift: dict = field(default_factory=dict)  # {norm name: relative change of its output}
    inputs: dict = field(default_factory=dict)
    reference: Optional[tuple] = None  # the unpatched model's checked outputs on ``inputs`` (fold_trace)

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
    params, done = {}, set()
    for name in names:
        info, module = plan.chosen[name]
        if id(module) in done:  # an alias: one module under two names gets one affine (functional_call
            continue  # with both names, untied, left one of the trial values in the module)
        done.add(id(module))
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
    """Round-off of the folded weights and of the model's own arithmetic, not more: a fold that is off by
    1e-4 (a read the graph analysis cannot see, at a small weight) is not exact. A float64 model still
    computes some norms in float32 (Gemma's, Cohere's: about 6e-8 of round-off)."""
    dtype = next(model.parameters()).dtype
    return {torch.float16: 5e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}.get(dtype, 1e-4)


def plan_fold(model: nn.Module, chosen: dict, built: dict) -> FoldPlan:
    """Decide, per norm in ``chosen``, whether its affine folds exactly; changes nothing.

    Raises ``ValueError`` if the model cannot be probed (meta weights, unsupported inputs).
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("fold_affine=True needs the model's weights, but some are on the meta "
                         "device; load the weights first (or patch without fold_affine)")
    plan = FoldPlan(chosen, inputs=probe_inputs(model))
    names = {}  # every name of each chosen module, chosen or not
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(path)
    with eval_no_grad(model):
        try:
            traced = trace(model, chosen, built, plan.inputs)
        except (TypeError, AttributeError, RuntimeError, IndexError, KeyError) as err:
            raise ValueError(f"fold_affine=True needs a probe batch, and {type(model).__name__} cannot run the "
                             f"one built for it ({sorted(plan.inputs)}: {type(err).__name__}: {err}). Patch "
                             "without fold_affine instead.") from err
        plan.reference, plan.drift = traced.reference, traced.drift
        owners = {}
        for name, found in traced.consumers.items():
            for cname in found:
                owners.setdefault(cname, []).append(name)
        for name, found in traced.consumers.items():
            info, module = chosen[name]
            why = (_alias_refusal(names[id(module)]) or _nothing_to_fold(info)
                   or _refusal(name, found, owners, traced.foreign.get(name, [])))
            if why:
                plan.refused[name] = why
            else:
                plan.folds[name] = sorted(found)
        _verify_numerically(plan, model)
    return plan


def _alias_refusal(paths: list) -> Optional[str]:
    """One module registered under several names: its readers at every site are traced as one, though a
    site left out of the patch (``exclude``) keeps the original norm and its affine."""
    if len(paths) > 1:
        return f"it is one module registered under several names ({', '.join(paths)}), which is never folded"
    return None


def _nothing_to_fold(info) -> Optional[str]:
    if not info.gain and not info.bias:
        return "it has no gain or bias, so there is nothing to fold (the swap alone keeps y)"
    return None


def _refusal(name, found, owners, foreign) -> Optional[str]:
    if "the model output" in foreign:
        return "its output is the model's output"
    others = [f"{c} ({type(m).__name__})" for c, m in found.items() if not is_linear(m)]
    if others:  # a module (an nn.Dropout, a residual block's own layer) is named as such
        return f"its output feeds {', '.join(sorted(others))}, not only Linear layers"
    if foreign:  # autograd nodes (AddBackward0: a residual connection), an in-place change, F.dropout
        kinds = ", ".join(sorted(set(foreign)))
        residual = " (a residual connection)" if "AddBackward0" in foreign else ""
        return f"its output is also read by {kinds}{residual}, not only by Linear layers"
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
    if outputs_drift(everything, ref) <= tol:
        return
    for name in list(plan.folds):
        out = run(model, plan.inputs, _trial_params(plan, model, names, {name}))
        if outputs_drift(out, ref) > tol:
            del plan.folds[name]
            plan.refused[name] = "folding it changes the model's output (numerical check)"


def fold_summary(model: nn.Module, plan: FoldPlan, report, applied=None) -> dict:
    """Annotate ``report`` and return the ``fold`` part of the patch record.

    When the fold was ``applied`` (a :class:`~.fold_state.FoldState`), also measures the whole
    patched model's output drift on the probe batch.
    """
    by_name = {e.name: e for e in report.entries}
    for name, cnames in plan.folds.items():
        # exact for what the model computes from it; an output read off this norm itself (a hidden state
        # returned by the model, BART's encoder_last_hidden_state) is y, without the gain and bias
        by_name[name].reason = (f"affine folded into {', '.join(cnames)} (an exact fold: the model's outputs "
                                "change only where the new norm differs from the plain normalization y; a hidden "
                                "state the model returns from this norm's output is now y, without its gain and "
                                "bias)")
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
            summary["output_drift"] = outputs_drift(run(model, plan.inputs), plan.reference)
        summary["untied"], summary["added_bias"] = applied.untied, applied.added_bias
        if applied.kept_ties:  # (a key only where there are some: records without it load as before)
            summary["kept_ties"] = applied.kept_ties
        report.output_drift = summary["output_drift"]
    return summary

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

Memory: by default nothing of the folded layers' originals is kept, so the fold costs
no memory, and ``unpatch_model`` of a folded model refuses (reload the original
instead).  With ``exact_unfold=True`` the original parameter objects are kept, their
data moved to CPU memory (never on an accelerator), and ``unpatch_model`` restores
them bitwise, converted to the model's current dtype and device; it refuses if the
folded layers changed since (training) or the model went through a lossy dtype
round trip.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .fold_trace import (PROBE_SHAPE, eval_no_grad, is_conv1d, is_linear, probe_inputs,
                         relative_drift, run, trace)


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


# Values that any precision-losing chain of dtype conversions changes (fp16 range, bf16 and fp16
# mantissas, fp32 mantissa): a non-persistent buffer of them follows the model's moves, so unfold
# can tell whether converting the kept original once gives what the moved model would hold.
_WITNESS_VALUES = (1.0 + 2.0 ** -9, 1.0 + 2.0 ** -20, 7.0e4, 3.0e-39, -1.0 - 2.0 ** -40)
WITNESS_BUFFER = "hf_adanorm_fold_witness"


@dataclass
class FoldedLayer:
    """One folded Linear/Conv1D: the parameters installed, and (exact_unfold) the originals."""

    norm: str  # the norm whose affine it absorbed
    weight: nn.Parameter  # the folded parameters put in place
    bias: Optional[nn.Parameter]
    dtype: torch.dtype  # the weight's dtype when folded
    original_weight: Optional[nn.Parameter] = None  # exact_unfold: the original, its data in CPU memory
    original_bias: Optional[nn.Parameter] = None
    folded_bias: Optional[torch.Tensor] = None  # exact_unfold: a CPU copy of ``bias`` as folded
    tied_to: Optional[str] = None  # the weight was tied to this parameter, which stays in the model


@dataclass
class FoldState:
    """What :func:`unfold` needs; its tensors are kept off the model's device (see docs)."""

    layers: dict  # {consumer name: FoldedLayer}
    affine: dict  # exact_unfold: {norm name: (gain, bias) float64 on CPU}, to recompute the fold
    untied: list  # consumers that got their own copy of a tied weight
    added_bias: list  # consumers that had no bias and got one
    exact: bool  # the originals are kept: unfold restores them bitwise
    own_config: list = field(default_factory=list)  # (module, attr, shared config) swapped for a copy


def _shared_params(model) -> dict:
    """{id: [names]} of parameters reachable under more than one name (tied weights)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {pid: found for pid, found in names.items() if len(found) > 1}


def _give_own_config(model, undo: list) -> list:
    """Put a private copy of ``model.config`` everywhere the model refers to it (and its sub-configs).

    Untying needs ``tie_word_embeddings = False``; a config object is often shared with another
    model (a baseline), which must not see that change.  Returns what :func:`unfold` puts back.
    """
    from transformers import PretrainedConfig
    old = model.config
    new = copy.deepcopy(old)
    mapping = {id(old): new}
    for attr, value in vars(old).items():
        if isinstance(value, PretrainedConfig):
            mapping[id(value)] = getattr(new, attr)
    swapped = []
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if id(value) in mapping and isinstance(value, PretrainedConfig):
                module.__dict__[attr] = mapping[id(value)]
                swapped.append((module, attr, value))
    undo.append(lambda: _put_back_configs(swapped))
    for cfg in {id(c): c for c in (new, new.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return swapped


def _put_back_configs(swapped: list) -> None:
    for module, attr, value in swapped:
        module.__dict__[attr] = value


def apply_fold(model: nn.Module, plan: FoldPlan, built: dict, undo: list, exact: bool) -> FoldState:
    """Fold every planned norm into its consumers.

    Each change appends its inverse to ``undo`` (the patcher runs them if a later step fails).
    With ``exact`` the original parameters are kept, their data moved to CPU memory, and a
    witness buffer is put on each replacement norm in ``built``; otherwise nothing is kept.
    """
    shared = _shared_params(model)
    layers, untied, added_bias, affine = {}, [], [], {}
    for name, cnames in plan.folds.items():
        gain, bias = plan.affine(name)
        if exact:  # to recompute the fold when unfolding, and so see whether the layer changed
            affine[name] = (gain.cpu(), None if bias is None else bias.cpu())
        for cname in cnames:
            layer = model.get_submodule(cname)
            old_w, old_b = layer.weight, layer.bias
            if id(old_w) in shared:
                untied.append(cname)
            new_w, new_c = folded_linear(layer, gain, bias)
            layer.weight = nn.Parameter(new_w, requires_grad=old_w.requires_grad)
            undo.append(lambda layer=layer, w=old_w, b=old_b: _set_params(layer, w, b))
            if new_c is not None:
                if old_b is None:
                    added_bias.append(cname)
                layer.bias = nn.Parameter(new_c, requires_grad=old_w.requires_grad if old_b is None
                                          else old_b.requires_grad)
            folded = FoldedLayer(name, layer.weight, layer.bias, old_w.dtype)
            if id(old_w) in shared:  # still in the model under its other name(s): found there again
                folded.tied_to = next(n for n in shared[id(old_w)] if n != f"{cname}.weight")
            if exact:  # originals that are still in the model (tied) stay where they are
                folded.folded_bias = None if layer.bias is None else layer.bias.detach().cpu().clone()
                folded.original_weight = old_w if id(old_w) in shared else _to_cpu_memory(old_w, undo)
                folded.original_bias = (old_b if old_b is None or id(old_b) in shared
                                        else _to_cpu_memory(old_b, undo))
            layers[cname] = folded
        if exact:
            dtype = model.get_submodule(cnames[0]).weight.dtype
            device = model.get_submodule(cnames[0]).weight.device
            built[name].register_buffer(WITNESS_BUFFER, torch.tensor(_WITNESS_VALUES, dtype=dtype,
                                        device=device), persistent=False)
    state = FoldState(layers, affine, untied, added_bias, exact)
    if untied and getattr(model, "config", None) is not None:
        # The consumer has its own weight now: keep save/load from tying it back.
        state.own_config = _give_own_config(model, undo)
    return state


def converted(param: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``param`` holding ``new`` (same object, as ``nn.Module.to`` does), or, where torch cannot
    swap the data in place (e.g. CPU to meta), a new Parameter, again as ``nn.Module.to`` does."""
    if torch._has_compatible_shallow_copy_type(param, new):
        param.data = new
        return param
    return nn.Parameter(new, requires_grad=param.requires_grad) if isinstance(param, nn.Parameter) else new


def _set_params(layer, weight, bias) -> None:
    layer.weight, layer.bias = weight, bias  # the very objects (a None bias unregisters it)


def _to_cpu_memory(param: nn.Parameter, undo: list) -> nn.Parameter:
    """Move ``param``'s data (not in the model any more) to CPU memory; same object."""
    if param.device.type != "cpu":
        on_device = param.data
        param.data = on_device.to("cpu")
        undo.append(lambda: setattr(param, "data", on_device))
    return param


def fold_summary(model: nn.Module, plan: FoldPlan, report, applied: Optional[FoldState] = None) -> dict:
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


def unfold(model: nn.Module, state: FoldState) -> list:
    """Check that the folded layers can be restored bitwise; return the steps that restore them.

    Raises ``RuntimeError`` (changing nothing) when the originals were not kept
    (``exact_unfold=False``), when a folded layer changed since ``patch_model`` (e.g. trained:
    restoring would discard that), or when the model went through a dtype conversion that lost
    precision (then no kept original converts to what the moved model would hold).  The
    model's current dtype and device are those of each folded weight.
    """
    if state.layers and not state.exact:
        raise RuntimeError(
            "cannot unpatch: fold_affine=True changed Linear layers and kept no copy of their original "
            "weights (that copy costs as much memory as those layers). Reload the original model, or "
            "patch with fold_affine=True, exact_unfold=True to keep the copy (in CPU memory).")
    changed, lossy, steps = [], [], []
    for cname, folded in state.layers.items():
        layer = model.get_submodule(cname)
        current_w, current_b = layer.weight, layer.bias
        witness = model.get_submodule(folded.norm)._buffers.get(WITNESS_BUFFER)
        if witness is None or (not witness.is_meta and not torch.equal(
                witness.detach().cpu(), torch.tensor(_WITNESS_VALUES, dtype=folded.dtype).to(witness.dtype))):
            lossy.append(cname)
            continue
        if current_w.is_meta:  # moved to the meta device: no values left to compare or lose
            pass
        elif current_w is not folded.weight or current_b is not folded.bias or not _still_folded(
                model, layer, folded, state.affine[folded.norm]):
            changed.append(cname)
            continue
        steps.append((layer, folded, current_w.dtype, current_w.device))
    if changed:
        raise RuntimeError(
            f"cannot unpatch: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} absorbed "
            "the norms' gain and bias (fold_affine=True) and were changed since (training?); "
            "restoring the originals would silently discard those changes. Save the trained model "
            "with hf_adanorm.save_pretrained instead (plain=True gives a stock checkpoint for "
            "layernorm_simple).")
    if lossy:
        raise RuntimeError(
            f"cannot unpatch exactly: the model was converted through a lower precision since it was "
            f"patched (e.g. .half() then .float()), so the kept originals of {', '.join(lossy[:4])} "
            "cannot reproduce what the unpatched model would hold after the same moves. Unpatch "
            "before changing dtype, or reload the original model.")

    def restore():
        for layer, folded, dtype, device in steps:
            weight, bias = (None if t is None else converted(t, t.detach().to(device=device, dtype=dtype))
                            for t in (folded.original_weight, folded.original_bias))
            if folded.tied_to is not None:  # tie it again to what the model holds now (moved with it)
                weight = model.get_parameter(folded.tied_to)
            _set_params(layer, weight, bias)
        _put_back_configs(state.own_config)
    return [restore]


def _still_folded(model, layer, folded: FoldedLayer, affine) -> bool:
    """Does ``layer`` hold exactly the fold of the kept original, converted as the model was?

    The weight is recomputed block by block on CPU (exact, device independent); the bias, a
    sum, is compared with the copy kept when folding.
    """
    if (folded.folded_bias is None) != (layer.bias is None) or (
            layer.bias is not None and not torch.equal(folded.folded_bias.to(layer.bias.dtype),
                                                       layer.bias.detach().cpu())):
        return False
    now = layer.weight.detach()
    # a tied original is still in the model and was moved with it: back to the dtype it was folded in
    original = (model.get_parameter(folded.tied_to) if folded.tied_to is not None
                else folded.original_weight).detach()
    if original.dtype not in (folded.dtype, torch.float64):
        # a tied original moved to a narrower dtype with the model cannot give the fold's inputs
        # back: only the bias (trained along with the weight) tells whether the layer changed
        return True
    original = original.to(folded.dtype)
    for rows, block in _weight_chunks(original, affine[0], is_conv1d(layer)):
        if not torch.equal(block.to(now.dtype), now[rows].cpu()):
            return False
    return True

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

Which norms qualify is decided on the model itself, not from architecture names,
in one probe forward pass (a fixed random batch):

1. every norm's output is handed on as ``out + 0`` (same values, its own autograd
   node) and every Linear/Conv1D input through ``view_as``, so in the autograd graph
   each read of a norm's output is a node pointing at that mark; a norm folds only if all reads
   are Linear/Conv1D inputs (no residual add, no dropout, not the model output) and
   those layers read no other norm;
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

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

_FOLD_ATTR = "_hf_adanorm_fold"
_PROBE_SHAPE = (2, 8)  # batch x tokens of the probe batch


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but fold works on plain torch too
        return False
    return isinstance(module, Conv1D)


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return ((type(module) is nn.Linear or _is_conv1d(module)) and isinstance(weight, torch.Tensor)
            and weight.is_floating_point() and weight.dim() == 2)


def folded_linear(module: nn.Module, gain: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(W', c')`` for a Linear/Conv1D fed by ``gain * y + bias``; computed in float64.

    ``c'`` is None when the layer has no bias and there is no norm bias to absorb
    (``bias`` None); otherwise a layer without a bias gets ``c' = W bias``.
    """
    w = module.weight.detach().double()
    s = gain.double().to(w.device)
    conv = _is_conv1d(module)
    new_w = w * (s[:, None] if conv else s[None, :])
    c = module.bias
    new_c = None if c is None else c.detach().double()
    if bias is not None:
        shift = bias.double().to(w.device) @ w if conv else w @ bias.double().to(w.device)
        new_c = shift if new_c is None else new_c + shift
    dtype = module.weight.dtype
    return new_w.to(dtype), (None if new_c is None else new_c.to(dtype))


def _primary_output(out) -> torch.Tensor:
    """The output compared for drift: ``logits``, else ``last_hidden_state``, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def relative_drift(new: torch.Tensor, ref: torch.Tensor) -> float:
    """``||new - ref|| / ||ref||`` (Frobenius), in float64."""
    ref64 = ref.detach().double()
    return float((new.detach().double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


def probe_inputs(model: nn.Module) -> dict:
    """A fixed random batch for ``model``: token ids (2 x 8) or images, on the model's device."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    if config is not None and name == "input_ids":
        vocab = getattr(config.get_text_config(), "vocab_size", None) or 2
        ids = torch.randint(0, vocab, _PROBE_SHAPE, generator=gen)
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : _PROBE_SHAPE[1] // 2 + 1]
    elif config is not None and name == "pixel_values" and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs = {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=gen)}
    else:
        raise ValueError(
            f"fold_affine=True needs a probe batch and cannot build one for {type(model).__name__} "
            f"(main input {name!r}); it supports transformers models taking input_ids or "
            "pixel_values. Patch without fold_affine instead.")
    return {k: v.to(device) for k, v in inputs.items()}


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    """Run probes deterministically (no dropout), then restore every module's own training flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _run(model, inputs, params=None) -> torch.Tensor:
    if params:
        out = functional_call(model, params, args=(), kwargs=inputs, tie_weights=False, strict=False)
    else:
        out = model(**inputs)
    return _primary_output(out)


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
        gain = getattr(module, info.gain).detach() + info.gain_offset if info.gain else None
        if gain is None:
            gain = torch.ones(info.size, dtype=torch.float64)
        bias = getattr(module, info.bias).detach() if info.bias else None
        return gain, bias


def _signature(t: torch.Tensor):
    """Same memory, shape, strides and dtype: the tensor itself or a no-op view of it (such as
    ``h[:, 0:, :]`` before an LM head).  The traced outputs are held, so addresses stay unique."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


@dataclass
class _Trace:
    consumers: dict  # {norm: {leaf module name: module}} receiving the norm's output
    foreign: dict  # {norm: [autograd node names]} reads of the output that are no Linear input
    drift: dict  # {norm: ||replacement(x) - norm(x)|| / ||norm(x)||} on the probe batch
    reference: torch.Tensor


def _trace(model, chosen: dict, built: dict, inputs: dict) -> _Trace:
    """One forward pass recording who reads each norm's output (see the module docstring)."""
    leaves, consumers, handles = {}, {name: {} for name in chosen}, []
    linear_reads = []  # the view_as nodes made for Linear inputs that are norm outputs
    sq = {name: [0.0, 0.0] for name in chosen}  # ||z' - z||^2, ||z||^2
    norm_ids = {id(module) for _, module in chosen.values()}

    def on_norm_output(name):
        def hook(_module, args, out):
            if not isinstance(out, torch.Tensor):
                return None
            with torch.no_grad():
                new, old = built[name](args[0]).double(), out.double()
                sq[name][0] += float((new - old).pow(2).sum())
                sq[name][1] += float(old.pow(2).sum())
            # ``out + 0`` (exactly ``out``) gives this output its own autograd node, which every
            # read points at, while keeping the graph connected to earlier norms.
            marked = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
            leaves[_signature(marked)] = (name, marked, marked.grad_fn)
            return marked
        return hook

    def on_leaf_input(name, module):
        def hook(_module, args, kwargs):
            hit = None
            for value in (*args, *kwargs.values()):
                found = leaves.get(_signature(value)) if isinstance(value, torch.Tensor) else None
                if found is not None:
                    consumers[found[0]][name] = module
                    hit = hit or found
            if hit is None or not _is_linear(module) or not args or _signature(args[0]) not in leaves:
                return None
            wrapped = args[0].view_as(args[0])
            linear_reads.append(wrapped.grad_fn)
            return (wrapped, *args[1:]), kwargs
        return hook

    for name, (_, module) in chosen.items():
        handles.append(module.register_forward_hook(on_norm_output(name)))
    for name, module in model.named_modules():
        if id(module) not in norm_ids and not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(on_leaf_input(name, module), with_kwargs=True))
    try:
        with torch.enable_grad():
            reference = _run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    foreign = _foreign_reads(reference, leaves, linear_reads)
    drift = {n: (d / z) ** 0.5 if z > 0 else 0.0 for n, (d, z) in sq.items()}
    return _Trace(consumers, foreign, drift, reference.detach())


def _foreign_reads(reference, leaves: dict, linear_reads: list) -> dict:
    """``{norm: [names of autograd nodes reading its output other than Linear inputs]}``."""
    users, stack, seen = {}, [reference.grad_fn], set()
    while stack:  # reverse the graph: node -> the nodes that read its result
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                users.setdefault(child, []).append(node)
                stack.append(child)
    marks = {node: name for name, _, node in leaves.values()}
    reads, views = set(linear_reads), set()  # Linear inputs; no-op views between them and a mark
    for node in linear_reads:
        chain = [node]
        while chain[-1] not in marks and chain[-1].next_functions and len(chain) < 8:
            chain.append(chain[-1].next_functions[0][0])
        views.update(chain[1:-1])
    foreign = {name: [] for name, _, _ in leaves.values()}
    for name, leaf, _ in leaves.values():
        if _signature(reference) == _signature(leaf):
            foreign[name].append("the model output")
    for mark, name in marks.items():
        frontier = [mark]
        while frontier:
            for user in users.get(frontier.pop(), ()):
                if user in views:
                    frontier.append(user)
                elif user not in reads:
                    foreign[name].append(type(user).__name__)
    return foreign


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
        ref = getattr(module, info.gain) if info.gain else None
        if info.gain:
            params[f"{name}.{info.gain}"] = (s_param - info.gain_offset).to(ref.dtype).to(ref.device)
        if b_param is not None:
            bias_ref = getattr(module, info.bias)
            params[f"{name}.{info.bias}"] = b_param.to(bias_ref.dtype).to(bias_ref.device)
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
    with _eval_no_grad(model):
        trace = _trace(model, chosen, built, plan.inputs)
        plan.reference, plan.drift = trace.reference, trace.drift
        owners = {}
        for name, found in trace.consumers.items():
            for cname in found:
                owners.setdefault(cname, []).append(name)
        for name, found in trace.consumers.items():
            why = _refusal(name, found, owners, trace.foreign.get(name, []))
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
    others = [f"{c} ({type(m).__name__})" for c, m in found.items() if not _is_linear(m)]
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
    ref = _run(model, plan.inputs, _trial_params(plan, model, names, set()))
    everything = _run(model, plan.inputs, _trial_params(plan, model, names, set(plan.folds)))
    if relative_drift(everything, ref) <= tol:
        return
    for name in list(plan.folds):
        out = _run(model, plan.inputs, _trial_params(plan, model, names, {name}))
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
        "probe": f"random token ids {list(_PROBE_SHAPE)}" if "input_ids" in plan.inputs else "random images",
    }
    if applied is not None:
        with _eval_no_grad(model):
            summary["output_drift"] = relative_drift(_run(model, plan.inputs), plan.reference)
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
        layer.weight = old_w
        if old_b is None:
            layer.bias = None
        else:
            layer.bias = old_b
    for cfg in state.tie_flags:
        cfg.tie_word_embeddings = True
    object.__setattr__(model, _FOLD_ATTR, None)

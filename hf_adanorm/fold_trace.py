"""The probe behind ``fold_affine``: who reads each norm's output, and how far outputs drift.

One forward pass on a fixed random batch (token ids, or images) answers, for every
norm about to be replaced, which modules receive its output and whether anything
else reads it.  Each norm's output is handed on as ``out + 0`` (the same values,
but its own autograd node) and each Linear/Conv1D input through ``view_as``; in the
autograd graph of the model's output every read of a norm's output is then a node
pointing at that norm's mark, so a read that is not a Linear input (a residual add,
dropout, the output itself) shows up by name.  No-op views between a norm and a
Linear (``h[:, 0:, :]`` before an LM head) are followed.  The same pass measures,
per norm, the drift ``||z' - z|| / ||z||`` of its output when replaced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

PROBE_SHAPE = (2, 8)  # batch x tokens of the probe batch


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but fold works on plain torch too
        return False
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2):
        return False
    if type(module) is nn.Linear or is_conv1d(module):
        return True
    return isinstance(module, nn.Linear) and _computes_linear(module)


def _computes_linear(module: nn.Linear) -> bool:
    """Whether a subclass of nn.Linear with a forward of its own computes ``F.linear(x, W, b)``, as
    Falcon's FalconLinear (``x @ W.T + b``) does, so that a fold into ``W`` and ``b`` is a fold of it.

    The rows of the test input are 0, unit vectors and a unit vector times -2: each output is then one
    column of W (times -2) plus b, computed without rounding in any summation order, so the two must
    agree bitwise. A forward that adds, scales, concatenates or gates anything differs. (The fold's
    numerical check of the whole model stays behind this, as for every fold.)"""
    weight, n = module.weight, module.weight.shape[1]
    if weight.device.type == "meta":
        return False
    x = torch.zeros(4, n, dtype=weight.dtype, device=weight.device)
    x[1, 0], x[2, n - 1], x[3, n // 2] = 1, 1, -2
    try:
        with torch.no_grad():
            got = type(module).forward(module, x)  # the class's forward, without the probe's hooks
    except Exception:  # noqa: BLE001 - a forward that takes no plain 2-D input is not taken for a Linear
        return False
    with torch.no_grad():
        want = F.linear(x, weight, module.bias)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got, want))


def primary_output(out) -> torch.Tensor:
    """The output compared for drift: ``logits``, else ``last_hidden_state``, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


# What a model returns that is a hidden state, not a result: a folded norm's own output returned as one is y,
# without the gain and bias (documented), so these are not checked. Every other floating tensor it returns
# (the logits, a second head's logits, a pooled output) must come out of a fold unchanged.
HIDDEN_STATE_OUTPUTS = frozenset({
    "last_hidden_state", "hidden_states", "attentions", "cross_attentions", "past_key_values", "mems",
    "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions", "decoder_hidden_states",
    "decoder_attentions"})


def checked_outputs(out) -> tuple:
    """What a fold must leave unchanged: :func:`primary_output` first, then every other floating tensor of a
    dict-like output but the hidden states (BertForPreTraining's ``seq_relationship_logits``, GPT-2's
    ``mc_logits``: heads that read a norm the primary head reads too)."""
    primary = primary_output(out)
    if not isinstance(out, dict):
        return (primary,)
    return (primary, *(value for key, value in out.items()
                       if key not in HIDDEN_STATE_OUTPUTS and value is not primary
                       and isinstance(value, torch.Tensor) and value.is_floating_point()))


def relative_drift(new: torch.Tensor, ref: torch.Tensor) -> float:
    """``||new - ref|| / ||ref||`` (Frobenius), in float64."""
    ref64 = ref.detach().double()
    return float((new.detach().double() - ref64).norm() / ref64.norm().clamp_min(1e-30))


def outputs_drift(new: tuple, ref: tuple) -> float:
    """The largest :func:`relative_drift` over the outputs of :func:`checked_outputs`."""
    return max(relative_drift(n, r) for n, r in zip(new, ref, strict=True))


def probe_inputs(model: nn.Module) -> dict:
    """A fixed random batch for ``model``: token ids (2 x 8) or images, on the model's device."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    if config is not None and name == "input_ids":
        vocab = getattr(config.get_text_config(), "vocab_size", None) or 2
        ids = torch.randint(0, vocab, PROBE_SHAPE, generator=gen)
        inputs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : PROBE_SHAPE[1] // 2 + 1]
    elif config is not None and name == "pixel_values" and hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs = {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=gen)}
    else:
        raise ValueError(
            f"fold_affine=True needs a probe batch and cannot build one for {type(model).__name__} "
            f"(main input {name!r}); it supports transformers models taking input_ids or "
            "pixel_values. Patch without fold_affine instead.")
    # images in the weights' dtype: a bf16 Swin does not cast its pixels itself
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@contextlib.contextmanager
def eval_no_grad(model: nn.Module):
    """Run probes deterministically (no dropout), then restore every module's own training flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def run(model, inputs, params=None) -> tuple:
    """The model's :func:`checked_outputs` on ``inputs`` (with ``params`` swapped in, if given)."""
    if params:
        out = functional_call(model, params, args=(), kwargs=inputs, tie_weights=False, strict=False)
    else:
        out = model(**inputs)
    return checked_outputs(out)


def _signature(t: torch.Tensor):
    """Same memory, shape, strides and dtype: the tensor itself or a no-op view of it (such as
    ``h[:, 0:, :]`` before an LM head).  The traced outputs are held, so addresses stay unique."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


@dataclass
class Trace:
    consumers: dict  # {norm: {leaf module name: module}} receiving the norm's output
    foreign: dict  # {norm: [autograd node names]} reads of the output that are no Linear input
    drift: dict  # {norm: ||replacement(x) - norm(x)|| / ||norm(x)||} on the probe batch
    reference: tuple  # the checked outputs (checked_outputs)


# Functional dropout leaves no autograd node in eval mode, where the probe runs, but in training it masks
# the norm's bias too, which a fold moves into the Linear after it: a read like any other non-Linear one.
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


class _SeeFunctionalDropout(TorchFunctionMode):
    """Record which norm outputs (by :func:`_signature`) go through a functional dropout."""

    def __init__(self, leaves: dict, foreign: dict):
        super().__init__()
        self.leaves, self.foreign = leaves, foreign

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DROPOUTS and args and isinstance(args[0], torch.Tensor):
            found = self.leaves.get(_signature(args[0]))
            if found is not None:
                self.foreign.setdefault(found[0], []).append(f"{func.__name__} (in training)")
        return func(*args, **(kwargs or {}))


def trace(model, chosen: dict, built: dict, inputs: dict) -> Trace:
    """One forward pass recording who reads each norm's output (see the module docstring)."""
    leaves, consumers, handles = {}, {name: {} for name in chosen}, []
    linear_reads = []  # the view_as nodes made for Linear inputs that are norm outputs
    seen_foreign = {}  # {norm: [what]} reads the autograd graph does not show
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
            leaves[_signature(marked)] = (name, marked, marked.grad_fn, marked._version)
            return marked
        return hook

    def on_leaf_input(name, module):
        def hook(_module, args, kwargs):
            hit = None
            for value in (*args, *kwargs.values()):
                found = leaves.get(_signature(value)) if isinstance(value, torch.Tensor) else None
                if found is not None and value._version != found[3]:
                    # changed in place since the norm (a masked_fill_ of the padding): not the norm's
                    # output any more, and the change need not show on the probe batch
                    seen_foreign.setdefault(found[0], []).append("an in-place change")
                    found = None
                if found is not None:
                    consumers[found[0]][name] = module
                    hit = hit or found
            if hit is None or not is_linear(module) or not args or leaves.get(_signature(args[0])) is not hit:
                return None
            wrapped = args[0].view_as(args[0])
            linear_reads.append(wrapped.grad_fn)
            return (wrapped, *args[1:]), kwargs
        return hook

    hooked = set()
    for name, (_, module) in chosen.items():
        if id(module) not in hooked:  # an alias (one module under two names) is hooked once
            hooked.add(id(module))
            handles.append(module.register_forward_hook(on_norm_output(name)))
    for name, module in model.named_modules():
        if id(module) not in norm_ids and not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(on_leaf_input(name, module), with_kwargs=True))
    try:
        with torch.enable_grad(), _SeeFunctionalDropout(leaves, seen_foreign):
            reference = run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    foreign = _foreign_reads(reference, leaves, linear_reads)
    for name, what in seen_foreign.items():
        foreign.setdefault(name, []).extend(what)
    drift = {n: (d / z) ** 0.5 if z > 0 else 0.0 for n, (d, z) in sq.items()}
    return Trace(consumers, foreign, drift, tuple(t.detach() for t in reference))


def _foreign_reads(references: tuple, leaves: dict, linear_reads: list) -> dict:
    """``{norm: [names of autograd nodes reading its output other than Linear inputs]}``, over the
    graphs of every checked output."""
    users, stack, seen = {}, [t.grad_fn for t in references], set()
    while stack:  # reverse the graph: node -> the nodes that read its result
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                users.setdefault(child, []).append(node)
                stack.append(child)
    marks = {node: name for name, _, node, _ in leaves.values()}
    reads, views = set(linear_reads), set()  # Linear inputs; no-op views between them and a mark
    for node in linear_reads:
        chain = [node]
        while chain[-1] not in marks and chain[-1].next_functions and len(chain) < 8:
            chain.append(chain[-1].next_functions[0][0])
        views.update(chain[1:-1])
    foreign = {name: [] for name, _, _, _ in leaves.values()}
    for name, leaf, _, _ in leaves.values():
        if any(_signature(output) == _signature(leaf) for output in references):
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

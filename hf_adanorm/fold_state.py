"""Undoing ``fold_affine``: what is kept (by default nothing), and the exact unfold.

:func:`apply_fold` carries out a :class:`~.fold.FoldPlan` as part of the patcher's
transaction (each change logs its inverse).  By default nothing of the folded layers'
originals is kept: the fold costs no memory and :func:`unfold` refuses.  With
``exact_unfold=True`` the original parameter objects are kept, their data moved to CPU
memory (never on an accelerator), and :func:`unfold` restores them bitwise, converted to
the model's current dtype and device, after checking that each folded layer still holds
exactly the fold of its original (not trained since) and that the model went through no
lossy dtype round trip (a witness buffer that follows the model's moves tells).  A folded
layer whose original stays in the model (a tied LM head) also keeps a fingerprint of its
folded weight in each narrower dtype, so that a change to it is seen after ``.half()`` too.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .fold import _CHUNK_ELEMENTS, FoldPlan, _weight_chunks, folded_linear
from .fold_trace import is_conv1d

# Values that any precision-losing chain of dtype conversions changes (fp16 range, bf16 and fp16
# mantissas, fp32 mantissa): a non-persistent buffer of them follows the model's moves, so unfold
# can tell whether converting the kept original once gives what the moved model would hold.
_WITNESS_VALUES = (1.0 + 2.0 ** -9, 1.0 + 2.0 ** -20, 7.0e4, 3.0e-39, -1.0 - 2.0 ** -40)
WITNESS_BUFFER = "hf_adanorm_fold_witness"

# The dtypes that do not hold every value of the key dtype: a tied original moved to one of them
# (with the model) no longer gives the inputs of the fold, so the folded weight cannot be
# recomputed from it and a fingerprint taken when folding has to tell whether the layer changed.
_NARROWER = {torch.float64: (torch.float32, torch.float16, torch.bfloat16),
             torch.float32: (torch.float16, torch.bfloat16),
             torch.float16: (torch.bfloat16,), torch.bfloat16: (torch.float16,)}


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
    # exact_unfold and tied: {dtype: digest of ``weight`` converted to dtype} for the _NARROWER dtypes
    fingerprints: dict = field(default_factory=dict)
    original_fingerprints: dict = field(default_factory=dict)  # the same of the tied original


@dataclass
class FoldState:
    """What :func:`unfold` needs; its tensors are kept off the model's device (see docs)."""

    layers: dict  # {consumer name: FoldedLayer}
    affine: dict  # exact_unfold: {norm name: (gain, bias) float64 on CPU}, to recompute the fold
    untied: list  # consumers that got their own copy of a tied weight
    added_bias: list  # consumers that had no bias and got one
    exact: bool  # the originals are kept: unfold restores them bitwise
    own_config: list = field(default_factory=list)  # (module, attr, shared config) swapped for a copy
    kept_ties: dict = field(default_factory=dict)  # {target: source} ties the untying flag drops too (BART)
    tied_keys: Optional[dict] = None  # the model's all_tied_weights_keys before, given back by unfold


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
            if exact and folded.tied_to is not None:  # its original moves with the model: see _still_folded
                narrower = _NARROWER.get(layer.weight.dtype, ())
                folded.fingerprints = {dtype: _digest(layer.weight, dtype) for dtype in narrower}
                folded.original_fingerprints = {dtype: _digest(old_w, dtype) for dtype in narrower}
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
        before = _ties(model)
        state.own_config = _give_own_config(model, undo)
        after = _ties(model)
        # The flag also unties what the fold left tied (BART's encoder and decoder embeddings to model.shared):
        # the save writes them once, so a load would initialise them at random. They are recorded, and the
        # loaders tie them again (portable.keep_ties); transformers' own list of ties says so meanwhile.
        state.kept_ties = {target: source for target, source in before.items()
                           if target not in after and target.rpartition(".")[0] not in untied}
        if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
            state.tied_keys = model.all_tied_weights_keys
            model.all_tied_weights_keys = {**after, **state.kept_ties}
            undo.append(lambda: setattr(model, "all_tied_weights_keys", state.tied_keys))
    return state


def _ties(model) -> dict:
    """transformers' ``{target: source}`` parameter ties of ``model`` as its config now asks (none for a
    model that is not a transformers one)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return dict(expand(all_submodels=True)) if callable(expand) else {}


def converted(param: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``param`` holding ``new`` (same object, as ``nn.Module.to`` does), or, where torch cannot
    swap the data in place (e.g. CPU to meta), a new Parameter, again as ``nn.Module.to`` does."""
    if torch._has_compatible_shallow_copy_type(param, new):
        param.data = new
        return param
    return nn.Parameter(new, requires_grad=param.requires_grad) if isinstance(param, nn.Parameter) else new


def _digest(weight: torch.Tensor, dtype: torch.dtype) -> str:
    """A digest of the bits of ``weight`` converted to ``dtype`` (on CPU, in blocks of rows)."""
    digest = hashlib.blake2b(digest_size=16)
    step = max(1, _CHUNK_ELEMENTS // max(1, weight[0].numel()))
    for start in range(0, weight.shape[0], step):
        block = weight[start:start + step].detach().to(dtype).cpu().contiguous()
        digest.update(block.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _plain_layer(layer) -> bool:
    """Does ``layer`` hold its weight as its own parameter, so that setting it back replaces that?
    Not so for a wrapper such as PEFT's LoRA layer, whose ``weight`` reads its ``base_layer``'s."""
    return "weight" in layer._parameters and not hasattr(layer, "base_layer")


def _set_params(layer, weight, bias) -> None:
    if not _plain_layer(layer):  # would register stray parameters beside the base layer's folded ones
        raise RuntimeError(f"internal error: cannot set the parameters of a {type(layer).__name__}, "
                           "which does not hold its weight itself; please report this")
    layer.weight, layer.bias = weight, bias  # the very objects (a None bias unregisters it)


def _to_cpu_memory(param: nn.Parameter, undo: list) -> nn.Parameter:
    """Move ``param``'s data (not in the model any more) to CPU memory; same object."""
    if param.device.type != "cpu":
        on_device = param.data
        param.data = on_device.to("cpu")
        undo.append(lambda: setattr(param, "data", on_device))
    return param


def unfold(model: nn.Module, state: FoldState) -> list:
    """Check that the folded layers can be restored bitwise; return the steps that restore them.

    Raises ``RuntimeError`` (changing nothing) when the originals were not kept
    (``exact_unfold=False``), when a folded layer was replaced or wrapped (a PEFT LoRA layer)
    since ``patch_model``, when one changed since (e.g. trained: restoring would discard that),
    or when the model went through a dtype conversion that lost precision (then no kept
    original converts to what the moved model would hold).  The model's current dtype and
    device are those of each folded weight.  Each step is called with the caller's undo list,
    to which it appends the inverse of every change it makes.
    """
    if state.layers and not state.exact:
        raise RuntimeError(
            "cannot unpatch: fold_affine=True changed Linear layers and kept no copy of their original "
            "weights (that copy costs as much memory as those layers). Reload the original model, or "
            "patch with fold_affine=True, exact_unfold=True to keep the copy (in CPU memory).")
    replaced, changed, lossy, unknown, steps = [], [], [], [], []
    for cname, folded in state.layers.items():
        try:
            layer = model.get_submodule(cname)
        except AttributeError:
            layer = None
        if layer is None or not _plain_layer(layer):
            replaced.append((cname, layer))
            continue
        current_w, current_b = layer.weight, layer.bias
        witness = model.get_submodule(folded.norm)._buffers.get(WITNESS_BUFFER)
        if witness is None or (not witness.is_meta and not torch.equal(
                witness.detach().cpu(), torch.tensor(_WITNESS_VALUES, dtype=folded.dtype).to(witness.dtype))):
            lossy.append(cname)
            continue
        if current_w.is_meta:  # moved to the meta device: no values left to compare or lose
            if current_w.shape != folded.weight.shape:
                changed.append(cname)
                continue
        elif current_w is not folded.weight or current_b is not folded.bias:
            changed.append(cname)
            continue
        else:
            still = _still_folded(model, layer, folded, state.affine[folded.norm])
            if still is None:
                unknown.append(cname)
                continue
            if not still:
                changed.append(cname)
                continue
        steps.append((layer, folded, current_w.dtype, current_w.device))
    if replaced:
        names = ", ".join(n for n, _ in replaced[:4]) + (" ..." if len(replaced) > 4 else "")
        wrappers = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for _, m in replaced
                           if m is not None and hasattr(m, "base_layer")})
        if wrappers:
            raise RuntimeError(
                f"cannot unpatch: {names} absorbed the norms' gain and bias (fold_affine=True) and were "
                f"wrapped since ({', '.join(wrappers)}, e.g. PEFT LoRA layers), whose base_layer holds the "
                "folded weight; with the norms back, adapters trained on the folded layers would compute "
                "something else. Remove the adapters first: unpatch the model that peft_model.unload() "
                "returns (adapters dropped), or, to keep them, merge_and_unload() and save that model "
                "with hf_adanorm.save_pretrained (unpatching would discard the merged change).")
        raise RuntimeError(
            f"cannot unpatch: {names} absorbed the norms' gain and bias (fold_affine=True) and were "
            "replaced or removed since (no module there holds its weight as its own parameter), so "
            "there is nothing to put the originals back into. Reload the original model.")
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
    if unknown:
        folded = state.layers[unknown[0]]
        raise RuntimeError(
            f"cannot unpatch exactly: {', '.join(unknown[:4])} {'was' if len(unknown) == 1 else 'were'} "
            f"folded from {folded.tied_to}, a tied weight that was converted to "
            f"{model.get_parameter(folded.tied_to).dtype} since patching, and no fingerprint was kept "
            f"for {model.get_submodule(unknown[0]).weight.dtype}, so whether the folded weights changed "
            "since cannot be checked (restoring could silently discard a change). Unpatch before "
            "changing dtype, or reload the original model.")

    def restore(undo: list):
        for layer, folded, dtype, device in steps:
            undo.append(lambda layer=layer, w=layer.weight, b=layer.bias: _set_params(layer, w, b))
            weight, bias = (None if t is None else _converted_original(t, device, dtype, undo)
                            for t in (folded.original_weight, folded.original_bias))
            if folded.tied_to is not None:  # tie it again to what the model holds now (moved with it)
                weight = model.get_parameter(folded.tied_to)
            _set_params(layer, weight, bias)
        now = [(module, attr, module.__dict__[attr]) for module, attr, _ in state.own_config]
        undo.append(lambda: _put_back_configs(now))
        _put_back_configs(state.own_config)
        if state.tied_keys is not None:
            undo.append(lambda keys=model.all_tied_weights_keys: setattr(model, "all_tied_weights_keys", keys))
            model.all_tied_weights_keys = state.tied_keys
    return [restore]


def _converted_original(param, device, dtype, undo: list):
    """A kept original converted to the model's current ``device`` and ``dtype`` (the same object
    where torch allows it); ``undo`` gets what gives it its kept data back."""
    undo.append(lambda data=param.data: setattr(param, "data", data))
    return converted(param, param.detach().to(device=device, dtype=dtype))


def _still_folded(model, layer, folded: FoldedLayer, affine) -> Optional[bool]:
    """Does ``layer`` hold exactly the fold of the kept original, converted as the model was?

    The weight is recomputed block by block on CPU (exact, device independent); the bias, a
    sum, is compared with the copy kept when folding.  Where the original (tied, so moved with
    the model) went to a dtype that cannot give the fold's inputs back, the weight is compared
    with the fingerprint taken when folding; None if none was taken for its dtype (undecided).
    """
    if (folded.folded_bias is None) != (layer.bias is None) or (
            layer.bias is not None and not torch.equal(folded.folded_bias.to(layer.bias.dtype),
                                                       layer.bias.detach().cpu())):
        return False
    now = layer.weight.detach()
    # a tied original is still in the model and was moved with it: back to the dtype it was folded in
    original = (model.get_parameter(folded.tied_to) if folded.tied_to is not None
                else folded.original_weight).detach()
    if original.dtype in _NARROWER.get(folded.dtype, ()) or original.dtype not in _NARROWER:
        # the fold's inputs are lost (e.g. .half() of a tied LM head): the bias alone would miss a
        # change to the weight only, so the folded weight's bits are compared in its dtype now, and so
        # are the tied original's (an edit to it, e.g. to the input embeddings, would be tied back in)
        expected = folded.fingerprints.get(now.dtype)
        expected_original = folded.original_fingerprints.get(original.dtype)
        if expected is None or expected_original is None:
            return None
        return _digest(now, now.dtype) == expected and _digest(original, original.dtype) == expected_original
    original = original.to(folded.dtype)
    for rows, block in _weight_chunks(original, affine[0], is_conv1d(layer)):
        if not torch.equal(block.to(now.dtype), now[rows].cpu()):
            return False
    return True

"""The part of hf_adanorm every checkpoint carries: it needs only torch and the standard library.

:mod:`.remote_code` copies this file, as it is, into each checkpoint's
``modeling_hf_adanorm.py``; hf_adanorm's own loader uses the same functions.  So
the remote code and the library validate a record with the same code and raise the
same :class:`CheckpointError`, and the remote code's norm math is a copy of the
library's equations (:mod:`.functional`), checked against them in
tests/test_remote_code.py.  The norm detector (:mod:`.detect`) lives here too, so that
both readers check that each module a record names is a norm of the recorded kind with
the very same probe.  Nothing here may import hf_adanorm or transformers.
"""

import copy
import inspect
import math
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

RECORD_VERSION = 1
BUILTIN_NORMS = ("adanorm", "detachnorm", "layernorm_simple", "no_norm")
NORM_KINDS = ("layernorm", "rmsnorm")
MODEL_TYPE_PREFIX = "hf_adanorm_"  # config.json's model_type is MODEL_TYPE_PREFIX + the stock one
OUTPUT_DTYPE_BUFFER = "hf_adanorm_output_dtype"  # a replacement's 0-element buffer: see output_dtype_witness
STOCK_KEY = "hf_adanorm_stock"  # what the guard replaced: {"base_model_type", "field", "value"}
GUARD = ("not a stock transformers checkpoint: its LayerNorms were replaced by hf_adanorm. Load it with "
         "transformers.AutoModel...from_pretrained(path, trust_remote_code=True) (the class in its README), "
         "or hf_adanorm.from_pretrained(model_class, path)")


class CheckpointError(ValueError):
    """A checkpoint's hf_adanorm record cannot be used (newer, corrupted, unknown norm, wrong model ...)."""


def _corrupted(field, what):
    return CheckpointError(f"the hf_adanorm record in config.json is corrupted: {field} {what}; "
                           "re-save the model with hf_adanorm.save_pretrained")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def guard_config_dict(config_dict, base_model_type, field):
    """config.json's dict as saved: a model_type of its own, so that transformers' Auto classes need
    the remote code, and in ``field`` (the path to an integer size of the stock config class, such
    as ``["hidden_size"]`` or ``["text_config", "hidden_size"]``) a sentence saying how to load the
    model, which stock config classes refuse with that sentence in the message: a concrete class
    such as GPT2LMHeadModel reads any model_type."""
    guarded = dict(config_dict)
    guarded["model_type"] = MODEL_TYPE_PREFIX + base_model_type
    if field is None:  # a config with no such field: the model_type alone guards (Auto classes)
        guarded[STOCK_KEY] = {"base_model_type": base_model_type, "field": None}
        return guarded
    parent = guarded
    for key in field[:-1]:  # copy the nested dicts on the way: the caller's stay as they were
        parent[key] = dict(parent.get(key) or {})
        parent = parent[key]
    guarded[STOCK_KEY] = {"base_model_type": base_model_type, "field": list(field), "value": parent.get(field[-1])}
    parent[field[-1]] = GUARD
    return guarded


def unguard_config_dict(config_dict):
    """The stock config dict back from :func:`guard_config_dict`'s (returned as is if unguarded)."""
    stock = config_dict.get(STOCK_KEY)
    if stock is None:
        return dict(config_dict)
    field = stock.get("field") if isinstance(stock, dict) else ()
    if not (isinstance(stock.get("base_model_type"), str) and (field is None or (
            isinstance(field, list) and field and all(isinstance(key, str) for key in field)))):
        raise _corrupted(f"config.json's {STOCK_KEY}", f"is {stock!r}")
    plain = {k: v for k, v in config_dict.items() if k != STOCK_KEY}
    plain["model_type"] = stock["base_model_type"]
    if field is None:
        return plain
    parent = plain
    for key in field[:-1]:
        if not isinstance(parent.get(key), dict):
            raise _corrupted(f"config.json's {STOCK_KEY}", f"names the field {'.'.join(field)}, which is missing")
        parent[key] = dict(parent[key])
        parent = parent[key]
    parent[field[-1]] = stock.get("value")
    return plain


def check_record(record, norms=BUILTIN_NORMS):
    """Check a record's structure, names and numbers (not the model); returns its options dict.

    ``norms``: the norm names this reader can build.  Raises :class:`CheckpointError` naming the field.
    """
    if not isinstance(record, dict):
        raise _corrupted("the record", f"is a {type(record).__name__}, not a JSON object")
    version = record.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _corrupted("format_version", f"is {version!r}")
    if version > RECORD_VERSION:
        raise CheckpointError(
            f"this checkpoint was written by a newer hf_adanorm (record format {version}; this code reads "
            f"up to {RECORD_VERSION}): upgrade hf_adanorm (pip install -U hf_adanorm) and re-save")
    options = record.get("config")
    if not isinstance(options, dict):
        raise _corrupted("config", "is missing")
    norm = options.get("norm")
    if norm not in norms:
        raise CheckpointError(
            f"the checkpoint uses the norm {norm!r}, which this code cannot build (known: {sorted(norms)}); "
            + ("a norm added with hf_adanorm.register_norm has no remote code: register it, then load with "
               "hf_adanorm.from_pretrained" if isinstance(norm, str) else "the record is corrupted"))
    if norm == "adanorm":
        for name in ("k", "C"):
            if not (_is_number(options.get(name)) and options[name] > 0):
                raise _corrupted(f"config.{name}", f"is {options.get(name)!r}; AdaNorm needs a finite number > 0")
    if norm == "detachnorm" and options.get("detach") not in ("mean", "variance", "both"):
        raise _corrupted("config.detach", f"is {options.get('detach')!r}; expected 'mean', 'variance' or 'both'")
    if options.get("eps_mode") not in ("torch", "fairseq"):
        raise _corrupted("config.eps_mode", f"is {options.get('eps_mode')!r}; expected 'torch' or 'fairseq'")
    if options.get("eps") is not None and not (_is_number(options["eps"]) and options["eps"] > 0):
        raise _corrupted("config.eps", f"is {options['eps']!r}; expected null or a finite number > 0")
    if record.get("swap_in_progress") is not None:  # hf_adanorm.blend.SWAP_IN_PROGRESS (this file ships alone)
        raise CheckpointError(
            "this folder was saved while its norms were still being blended in (a Trainer checkpoint inside "
            "GradualSwapCallback's ramp): it computes neither the original model nor the patched one. It resumes "
            "that training (the same Trainer and GradualSwapCallback, resume_from_checkpoint=...); to load a "
            "model, take a checkpoint written after the ramp, or the final one")
    modules = record.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise _corrupted("modules", "is missing or empty")
    for name, entry in modules.items():
        field = f"modules[{name!r}]"
        if not name or not all(name.split(".")):
            raise _corrupted(field, "is not a module path (the model itself cannot be replaced)")
        if not isinstance(entry, dict):
            raise _corrupted(field, f"is {entry!r}")
        if entry.get("kind") not in NORM_KINDS:
            raise _corrupted(f"{field}.kind", f"is {entry.get('kind')!r}; expected one of {NORM_KINDS}")
        size = entry.get("size")
        if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise _corrupted(f"{field}.size", f"is {size!r}; expected a positive integer")
        if not (_is_number(entry.get("eps")) and entry["eps"] >= 0):
            raise _corrupted(f"{field}.eps", f"is {entry.get('eps')!r}; expected a finite number >= 0")
        if options.get("eps") is None and entry["eps"] == 0:  # (a module of eps 0 is patched only with eps=...)
            raise _corrupted(f"{field}.eps", "is 0 and config.eps is null, so the norm would use eps 0; "
                                             "every norm needs a finite eps > 0")
    fold = record.get("fold")
    added = fold.get("added_bias", []) if isinstance(fold, dict) else None
    if fold is not None and not (isinstance(added, list) and all(isinstance(n, str) and n for n in added)):
        raise _corrupted("fold", "is malformed (fold.added_bias must be a list of layer names)")
    ties = fold.get("kept_ties", {}) if isinstance(fold, dict) else {}
    if not (isinstance(ties, dict) and all(isinstance(n, str) and "." in n for n in (*ties, *ties.values()))):
        raise _corrupted("fold", "is malformed (fold.kept_ties must map parameter names to parameter names)")
    return options


def _submodule(model, name, field):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"the hf_adanorm record's {field} names {name!r}, which {type(model).__name__} does not have: "
            "load the checkpoint with the class it was saved from (see its README)") from None


def describe_norm(module):
    """The :class:`NormInfo` of a module the norm detector recognises as a last-dimension norm, else None."""
    with torch.device("cpu"):  # transformers builds models under a meta-device context; the probe runs on CPU
        info, _ = classify(module)
    return info


def check_against_model(model, record) -> dict:
    """Check that every module the record names exists in ``model`` and is a norm of the recorded
    kind and size (probed by the norm detector, as when patching), and that ``fold.added_bias``
    names Linear layers. Returns ``{name: (NormInfo, module)}`` of the recorded norms."""
    found = {}
    for name, entry in record["modules"].items():
        module = _submodule(model, name, "modules entry")
        info = describe_norm(module)
        kind, size = (info.kind, info.size) if info is not None else (None, None)
        found[name] = (info, module)
        if size is None:
            raise CheckpointError(f"the hf_adanorm record names {name!r}, but in {type(model).__name__} that is "
                                  f"a {type(module).__name__}, not a norm: the record does not belong to this model")
        if size != entry["size"] or kind != entry["kind"]:
            raise CheckpointError(
                f"the hf_adanorm record's modules[{name!r}] says a {entry['kind']} of size {entry['size']}, but "
                f"{type(model).__name__} has a {kind} of size {size} there: the record "
                "does not belong to this model")
    for name in (record.get("fold") or {}).get("added_bias", []):
        layer = _submodule(model, name, "fold.added_bias")
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"the hf_adanorm record's fold.added_bias names {name!r}, a "
                                  f"{type(layer).__name__}, not an nn.Linear: the record is corrupted")
    for name in (n for tie in (record.get("fold") or {}).get("kept_ties", {}).items() for n in tie):
        module_name, _, attr = name.rpartition(".")
        if not isinstance(getattr(_submodule(model, module_name, "fold.kept_ties"), attr, None), nn.Parameter):
            raise CheckpointError(f"the hf_adanorm record's fold.kept_ties names {name!r}, which is not a parameter "
                                  f"of {type(model).__name__}: load the checkpoint with the class it was saved from")
    return found


def output_dtype_witness(module, info):
    """For a norm that casts its output to its gain's half dtype (T5's: half after T5's float32 ``wo``), a
    0-element tensor of the gain's dtype: a non-persistent buffer of the replacement, it follows ``.to()``."""
    if not info.output_in_gain_dtype:
        return None
    gain = getattr(module, info.gain)
    return torch.empty(0, dtype=gain.dtype, device=gain.device)


def in_witness_dtype(module, z):
    """``z`` cast to the half dtype of ``module``'s output dtype witness, if it has one. A float32 witness casts
    nothing: T5 casts only to a half gain's dtype, and FSDP2's mixed precision casts the gain, not the buffer."""
    witness = module._buffers.get(OUTPUT_DTYPE_BUFFER)
    return z.to(witness.dtype) if witness is not None and witness.dtype in (torch.float16, torch.bfloat16) else z


def keep_ties(model, ties: dict) -> None:
    """Tie again what a fold's ``tie_word_embeddings = False`` untied beside its layer (BART's embeddings), so
    that transformers loads the one saved tensor into each instead of initialising the others at random."""
    for target, source in ties.items():
        module_name, _, attr = target.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
    if ties and isinstance(getattr(model, "all_tied_weights_keys", None), dict):
        model.all_tied_weights_keys = {**model.all_tied_weights_keys, **ties}


# ---------------------------------------------------------------- which modules are norms (hf_adanorm.detect)
# Each candidate leaf module is run once on a private CPU copy with known random parameters and compared
# with LayerNorm and RMSNorm references: see hf_adanorm/detect.py.

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "var_eps")
_BIAS_NAMES = re.compile(r"bias|beta", re.I)
_NOT_LAST_DIM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                 nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@dataclass(frozen=True)
class NormInfo:
    """What a detected norm computes: ``z = s * y + b`` over its last dimension."""

    kind: str  # "layernorm" or "rmsnorm"
    size: int
    eps: float
    gain: Optional[str]  # parameter name of the gain, if any
    gain_offset: float  # 1.0 when the scale is (1 + w)
    bias: Optional[str]  # parameter name of the bias, if any
    output_in_gain_dtype: bool = False  # casts its output to its gain's dtype when that is half (T5)


def looks_like_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def read_eps(module: nn.Module) -> Optional[float]:
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _extra_inputs(module: nn.Module) -> list[str]:
    """Inputs of ``forward`` beyond the tensor to normalize (e.g. the ``gate`` of a gated RMSNorm)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params[1:]]


def _size_of(module: nn.Module, params) -> Optional[int]:
    if params:
        return params[0][1].shape[0]
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        return int(shape[0])
    return None


def _probe_copy(module: nn.Module, tensors: dict) -> nn.Module:
    """A shallow copy of ``module`` with fresh CPU tensors and no hooks."""
    clone = copy.copy(module)
    clone._parameters = OrderedDict(  # keep None slots: MPT sets an nn.LayerNorm's bias to None
        (n, None if p is None else nn.Parameter(tensors[n], requires_grad=False))
        for n, p in module._parameters.items())
    clone._buffers = OrderedDict(
        (n, None if b is None else (torch.zeros(b.shape, dtype=torch.float32) if b.is_meta
                                    else b.detach().float().cpu().clone()))
        for n, b in module._buffers.items()
    )
    for name in HOOK_DICTS:
        if name in module.__dict__:
            setattr(clone, name, OrderedDict())
    clone.training = False
    return clone


@contextmanager
def one_thread():
    """Probe tensors are tiny: a thread pool only adds overhead (20x on busy shared cores).

    Re-entrant and cheap when already on one thread, so callers wrap a whole walk once.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _references(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The normalized ``x`` with the module's own eps (a large eps, e.g. 1e-1, changes it visibly)."""
    x = x.double()
    if kind == "layernorm":
        xc = x - x.mean(-1, keepdim=True)
        return xc / (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def classify(module: nn.Module) -> tuple[Optional[NormInfo], Optional[str]]:
    """``(info, None)`` for a last-dimension LayerNorm/RMSNorm; else ``(None, reason)``.

    ``reason`` is None for modules that are plainly not norms (Linear, Dropout ...)
    and a sentence for norm-like modules that are deliberately left alone.
    """
    named = looks_like_norm(module)
    if isinstance(module, _NOT_LAST_DIM):
        return None, f"{type(module).__name__} does not normalize over the last dimension"
    if parametrize.is_parametrized(module):  # its weight is computed by other modules: not swappable
        names = ", ".join(module.parametrizations.keys())
        return None, (f"has a parametrization on {names} (torch.nn.utils.parametrize); remove it "
                      "(parametrize.remove_parametrizations) to patch this norm" if named else None)
    if any(True for _ in module.children()):  # a container: its leaves are classified on their own
        return None, None
    extra = _extra_inputs(module)
    if extra:  # the one-input replacement could not take them (and would drop e.g. a gate)
        return None, (f"forward takes more inputs than the tensor ({', '.join(extra)}): "
                      "not a plain last-dimension norm" if named else None)
    if hasattr(module, "weight_g") or hasattr(module, "weight_v"):
        return None, "weight-norm wrapper" if named else None
    if getattr(module, "data_format", "channels_last") != "channels_last":
        return None, f"data_format={module.data_format!r} normalizes over channels, not the last dimension"
    params = list(module.named_parameters(recurse=False))
    if any(p.dim() != 1 for _, p in params) or len(params) > 2:
        if named:
            dims = sorted({p.dim() for _, p in params})
            return None, f"parameters of dimension {dims} (e.g. a per-head norm): not a last-dimension norm"
        return None, None
    if not params and not named and not hasattr(module, "normalized_shape"):
        return None, None
    size = _size_of(module, params)
    if size is None or any(p.shape[0] != size for _, p in params):
        return None, ("cannot tell the normalized size" if named else None)
    if any(b is not None and b.dim() > 0 and b.numel() > 1 and n not in module._non_persistent_buffers_set
           for n, b in module._buffers.items()):  # non-persistent ones are scratch (or hf_adanorm's)
        return None, ("keeps per-channel buffers (running statistics?)" if named else None)
    with one_thread():
        return _probe(module, params, size, named)


def _probe(module, params, size, named) -> tuple[Optional[NormInfo], Optional[str]]:
    # float32 whatever the default dtype (bfloat16 while transformers builds a bfloat16 model)
    gen, f32 = torch.Generator().manual_seed(1234), torch.float32
    values = {n: torch.randn(size, generator=gen, dtype=f32) * 0.5 + (0.0 if _BIAS_NAMES.search(n) else 1.0)
              for n, _ in params}
    gains = [n for n in values if not _BIAS_NAMES.search(n)]
    biases = [n for n in values if _BIAS_NAMES.search(n)]
    if len(gains) > 1 or len(biases) > 1:
        return None, ("two gain-like or bias-like parameters" if named else None)
    rows = 7 if size != 7 else 5  # a middle dim unequal to size catches channels-first norms
    x = torch.randn(3, rows, size, generator=gen, dtype=f32)
    x = x * (1 + 3 * torch.rand(3, rows, 1, generator=gen, dtype=f32))
    x = x + 4 * torch.rand(3, rows, 1, generator=gen, dtype=f32) + 1  # non-zero means separate LN from RMS
    clone = _probe_copy(module, values)
    try:
        with torch.no_grad():
            out = type(module).forward(clone, x)
    except Exception as err:  # noqa: BLE001 - any failure means "not a last-dim norm"
        return None, (f"probe failed ({type(err).__name__}): not a last-dimension norm" if named else None)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None, ("output shape differs from input" if named else None)
    out = out.double()
    gain = values[gains[0]].double() if gains else None
    bias = values[biases[0]].double() if biases else 0.0
    own_eps = read_eps(module)
    for kind in ("layernorm", "rmsnorm"):
        ref = _references(x, kind, own_eps if own_eps is not None and own_eps >= 0 else 0.0)
        for offset in ((0.0, 1.0) if gain is not None else (None,)):
            scale = 1.0 if offset is None else gain + offset
            if torch.allclose(out, ref * scale + bias, rtol=2e-3, atol=2e-3):
                eps = own_eps
                return NormInfo(kind, size, eps if eps is not None else _estimate_eps(clone, module, size, offset or 0.0),
                                gains[0] if gains else None, offset or 0.0,
                                biases[0] if biases else None, _output_in_gain_dtype(module, values, gains, x)), None
    return None, ("does not compute a last-dimension LayerNorm or RMSNorm" if named else None)


def _output_in_gain_dtype(module, values, gains, x) -> bool:
    """Whether a half gain makes a float32 input's output half (T5LayerNorm casts to its weight's dtype)."""
    if not gains:
        return False
    clone = _probe_copy(module, {n: v.half() if n == gains[0] else v for n, v in values.items()})
    try:
        with torch.no_grad():
            out = type(module).forward(clone, x)
    except Exception:  # noqa: BLE001 - mixed dtypes refused (nn.LayerNorm): the output dtype is the input's
        return False
    return isinstance(out, torch.Tensor) and out.dtype == torch.float16


def _estimate_eps(clone, module, size, offset) -> float:
    """Solve z = x / sqrt(v + eps) for eps on a low-variance input (no eps attribute found)."""
    # neutral affine: gain 1 (0 for 1 + w), bias 0; an unused slot (elementwise_affine=False) is None
    for name in (n for n, p in clone._parameters.items() if p is not None):
        clone._parameters[name].data.fill_(0.0 if _BIAS_NAMES.search(name) else 1.0 - offset)
    x = torch.zeros(1, 2, size, dtype=torch.float64)
    x[..., 0], x[..., 1 % size] = 1e-3, -1e-3
    with torch.no_grad():
        out = type(module).forward(clone, x.float()).double()
    v, z = x.pow(2).mean(-1), out[..., 0]
    if not torch.isfinite(z).all() or (z == 0).any():
        return 1e-5
    return max(float(((x[..., 0] / z) ** 2 - v).mean()), 0.0)


# ---------------------------------------------------------------- the norm math (see hf_adanorm.functional)

class _Normalize(torch.autograd.Function):
    """z = C (1 - k y) y over the last dimension, the factor detached; the gradient of
    hf_adanorm.functional (finite on constant rows in fairseq mode)."""

    @staticmethod
    def forward(ctx, x2d, eps, centre, fairseq, detach_mean, detach_scale, k, C):
        x = x2d.float() if x2d.dtype in (torch.float16, torch.bfloat16) else x2d
        d = x.shape[-1]
        if centre and not fairseq:
            y, mean, rstd = torch.ops.aten.native_layer_norm(x, [d], None, None, eps)
        else:
            mean = x.mean(-1, keepdim=True) if centre else x.new_zeros(x.shape[0], 1)
            if centre:  # fairseq: the mean's rounding error over sigma = eps made a constant row O(1)
                mean = mean + (x - mean).mean(-1, keepdim=True)
            xc = x - mean if centre else x
            v = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).square() / max(d - int(centre and fairseq), 1)
            rstd = (v.sqrt() + eps if fairseq else (v + eps).sqrt()).reciprocal()
            y = xc * rstd
        z = (y - k * y * y) * C if k else y * C
        ctx.save_for_backward(x2d, mean, rstd)
        ctx.conf = (eps, centre, fairseq, detach_mean, detach_scale, k, C)
        return z.to(x2d.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, mean, rstd = ctx.saved_tensors
        eps, centre, fairseq, detach_mean, detach_scale, k, C = ctx.conf
        half = x2d.dtype in (torch.float16, torch.bfloat16)  # statistics in float32, float64 kept
        x, g = (x2d.float(), grad.float()) if half else (x2d, grad.to(x2d.dtype))
        d = x.shape[-1]
        y = (x - mean) * rstd if centre else x * rstd
        gp = (g - k * y * g) * C
        dx = gp - gp.mean(-1, keepdim=True) if centre and not detach_mean else gp
        if not detach_scale:
            b = 1.0
            if fairseq:  # d sigma / d v differs; a constant row (sigma == eps) has y == 0: no term
                sigma = rstd.reciprocal()
                s = sigma - eps
                b = torch.where(s > 0, sigma * d / (max(d - int(centre), 1) * s.clamp_min(1e-30)), 0.0)
            dx = dx - b * y * (gp * y).mean(-1, keepdim=True)
        return (dx * rstd).to(x2d.dtype), None, None, None, None, None, None, None


class HFAdaNorm(nn.Module):
    """A parameter-free norm of hf_adanorm: layernorm_simple, adanorm, detachnorm or no_norm."""

    def __init__(self, size, eps, centre, options, output_dtype=None):
        super().__init__()
        self.size, self.eps, self.centre = size, float(eps), centre
        if output_dtype is not None:  # see output_dtype_witness
            self.register_buffer(OUTPUT_DTYPE_BUFFER, output_dtype, persistent=False)
        self.norm, self.fairseq = options["norm"], options["eps_mode"] == "fairseq"
        ada = self.norm == "adanorm"
        self.k, self.C = (float(options["k"]), float(options["C"])) if ada else (0.0, 1.0)
        detach = options.get("detach") if self.norm == "detachnorm" else None
        self.detach_mean, self.detach_scale = detach in ("mean", "both"), detach in ("variance", "both")

    def forward(self, x):
        if self.norm != "no_norm" and x.shape[-1:] != (self.size,):
            raise RuntimeError(f"{self.norm} expects inputs ending in [{self.size}], got shape {list(x.shape)}")
        z = x if self.norm == "no_norm" else _Normalize.apply(x.reshape(-1, self.size), self.eps, self.centre,
                                                              self.fairseq, self.detach_mean, self.detach_scale,
                                                              self.k, self.C).reshape(x.shape)
        return in_witness_dtype(self, z)

    def extra_repr(self):
        return f"{self.norm}, {self.size}, eps={self.eps}, centre={self.centre}, fairseq={self.fairseq}"


def record_for(model, record, saved_class):
    """``record`` as it applies to ``model``, a class other than ``saved_class`` (the name of the
    class that was saved) built from the same config: as transformers does with the weights, the
    base-model prefix (``transformer.``) is added or removed, and the parts of the saved head that
    ``model`` lacks are dropped (its own new head is initialised as transformers initialises it);
    a part it has at the same path (``cls.predictions`` of BertForMaskedLM in BertForPreTraining)
    gets that head's other weights from transformers, so its norm stays patched too."""
    if saved_class is None or type(model).__name__ == saved_class:
        return record
    prefix = getattr(model, "base_model_prefix", "") or ""
    saved_with_prefix = bool(prefix) and any(n.startswith(prefix + ".") for n in record["modules"])
    has_prefix = bool(prefix) and hasattr(model, prefix) and getattr(model, prefix) is not model
    present = {name for name, _ in model.named_modules()}

    def rename(name):
        if saved_with_prefix and not name.startswith(prefix + "."):  # a part of the saved head:
            return name if name in present else None  # kept where this class has it too
        if saved_with_prefix and not has_prefix:
            return name[len(prefix) + 1:]
        if has_prefix and not saved_with_prefix:
            return f"{prefix}.{name}"
        return name

    modules = {rename(n): e for n, e in record["modules"].items() if rename(n) is not None}
    fold = dict(record.get("fold") or {})
    if fold:
        fold["added_bias"] = [rename(n) for n in fold.get("added_bias", []) if rename(n) is not None]
        if "kept_ties" in fold:  # parameter names: their modules renamed
            def param(name):
                module = rename(name.rpartition(".")[0])
                return None if module is None else f"{module}.{name.rpartition('.')[2]}"
            fold["kept_ties"] = {param(t): param(s) for t, s in fold["kept_ties"].items()
                                 if param(t) is not None and param(s) is not None}
        for key in ("folded", "not_foldable"):  # what the fold reported, under this model's names
            if isinstance(fold.get(key), dict):
                fold[key] = {rename(n): v for n, v in fold[key].items() if rename(n) is not None}
    if not modules:
        raise CheckpointError(f"none of the norms the hf_adanorm record names is in a {type(model).__name__}; "
                              f"load the checkpoint as {saved_class}")
    return {**record, "modules": modules, **({"fold": fold} if fold else {})}


def apply_patch(model, record, saved_class=None):
    """Check ``record`` against ``model``, then swap the recorded norms in (and give folded layers
    the bias the checkpoint holds).  Nothing changes if a check fails.  ``saved_class``: the name
    of the class that was saved (config.architectures[0]), see :func:`record_for`.  Returns the
    record as applied (under ``model``'s module names)."""
    check_record(record)
    record = record_for(model, record, saved_class)
    options = record["config"]
    found = check_against_model(model, record)
    swaps = []
    for name, entry in record["modules"].items():
        eps = options["eps"] if options.get("eps") is not None else entry["eps"]
        swaps.append((name, HFAdaNorm(entry["size"], eps, entry["kind"] == "layernorm", options,
                                      output_dtype_witness(*reversed(found[name])))))
    for name, norm in swaps:
        parent_name, _, attr = name.rpartition(".")
        norm.train(model.get_submodule(name).training)
        setattr(model.get_submodule(parent_name), attr, norm)
    for name in (record.get("fold") or {}).get("added_bias", []):
        layer = model.get_submodule(name)
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))
    keep_ties(model, (record.get("fold") or {}).get("kept_ties", {}))
    return record

"""The part of hf_adanorm every checkpoint carries: it needs only torch and the standard library.

:mod:`.remote_code` copies this file, as it is, into each checkpoint's
``modeling_hf_adanorm.py``; hf_adanorm's own loader uses the same functions.  So
the remote code and the library validate a record with the same code and raise the
same :class:`CheckpointError`, and the remote code's norm math is a copy of the
library's equations (:mod:`.functional`), checked against them in
tests/test_remote_code.py.  Nothing here may import hf_adanorm or transformers.
"""

import math

import torch
from torch import nn

RECORD_VERSION = 1
BUILTIN_NORMS = ("adanorm", "detachnorm", "layernorm_simple", "no_norm")
NORM_KINDS = ("layernorm", "rmsnorm")
MODEL_TYPE_PREFIX = "hf_adanorm_"  # config.json's model_type is MODEL_TYPE_PREFIX + the stock one
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
    fold = record.get("fold")
    added = fold.get("added_bias", []) if isinstance(fold, dict) else None
    if fold is not None and not (isinstance(added, list) and all(isinstance(n, str) and n for n in added)):
        raise _corrupted("fold", "is malformed (fold.added_bias must be a list of layer names)")
    return options


def _submodule(model, name, field):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"the hf_adanorm record's {field} names {name!r}, which {type(model).__name__} does not have: "
            "load the checkpoint with the class it was saved from (see its README)") from None


def _norm_size(module):
    """The normalized size of a leaf module that looks like a last-dimension norm, else None."""
    if any(True for _ in module.children()) or "norm" not in type(module).__name__.lower():
        return None
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    weight = getattr(module, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def check_against_model(model, record, describe=None):
    """Check that every module the record names exists in ``model`` and is the norm it says;
    ``describe(module) -> (kind or None, size or None)`` (default: by class name and shape)."""
    for name, entry in record["modules"].items():
        module = _submodule(model, name, "modules entry")
        kind, size = describe(module) if describe else (None, _norm_size(module))
        if size is None:
            raise CheckpointError(f"the hf_adanorm record names {name!r}, but in {type(model).__name__} that is "
                                  f"a {type(module).__name__}, not a norm: the record does not belong to this model")
        if size != entry["size"] or (kind is not None and kind != entry["kind"]):
            raise CheckpointError(
                f"the hf_adanorm record's modules[{name!r}] says a {entry['kind']} of size {entry['size']}, but "
                f"{type(model).__name__} has a {kind or type(module).__name__} of size {size} there: the record "
                "does not belong to this model")
    for name in (record.get("fold") or {}).get("added_bias", []):
        layer = _submodule(model, name, "fold.added_bias")
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"the hf_adanorm record's fold.added_bias names {name!r}, a "
                                  f"{type(layer).__name__}, not an nn.Linear: the record is corrupted")


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

    def __init__(self, size, eps, centre, options):
        super().__init__()
        self.size, self.eps, self.centre = size, float(eps), centre
        self.norm, self.fairseq = options["norm"], options["eps_mode"] == "fairseq"
        ada = self.norm == "adanorm"
        self.k, self.C = (float(options["k"]), float(options["C"])) if ada else (0.0, 1.0)
        detach = options.get("detach") if self.norm == "detachnorm" else None
        self.detach_mean, self.detach_scale = detach in ("mean", "both"), detach in ("variance", "both")

    def forward(self, x):
        if self.norm == "no_norm":
            return x
        if x.shape[-1:] != (self.size,):
            raise RuntimeError(f"{self.norm} expects inputs ending in [{self.size}], got shape {list(x.shape)}")
        z = _Normalize.apply(x.reshape(-1, self.size), self.eps, self.centre, self.fairseq,
                             self.detach_mean, self.detach_scale, self.k, self.C)
        return z.reshape(x.shape)

    def extra_repr(self):
        return f"{self.norm}, {self.size}, eps={self.eps}, centre={self.centre}, fairseq={self.fairseq}"


def record_for(model, record, saved_class):
    """``record`` as it applies to ``model``, a class other than ``saved_class`` (the name of the
    class that was saved) built from the same config: as transformers does with the weights, the
    base-model prefix (``transformer.``) is added or removed, and the parts of the saved head that
    ``model`` lacks are dropped (its own new head is initialised as transformers initialises it)."""
    if saved_class is None or type(model).__name__ == saved_class:
        return record
    prefix = getattr(model, "base_model_prefix", "") or ""
    saved_with_prefix = bool(prefix) and any(n.startswith(prefix + ".") for n in record["modules"])
    has_prefix = bool(prefix) and hasattr(model, prefix) and getattr(model, prefix) is not model

    def rename(name):
        if saved_with_prefix and not has_prefix:
            return name[len(prefix) + 1:] if name.startswith(prefix + ".") else None  # a head part: dropped
        if has_prefix and not saved_with_prefix:
            name = f"{prefix}.{name}"
        if not has_prefix or name.startswith(prefix + "."):
            return name
        return None  # the saved head's own modules: this class has its own head

    modules = {rename(n): e for n, e in record["modules"].items() if rename(n) is not None}
    fold = dict(record.get("fold") or {})
    if fold:
        fold["added_bias"] = [rename(n) for n in fold.get("added_bias", []) if rename(n) is not None]
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
    of the class that was saved (config.architectures[0]), see :func:`record_for`."""
    check_record(record)
    record = record_for(model, record, saved_class)
    options = record["config"]
    check_against_model(model, record)
    swaps = []
    for name, entry in record["modules"].items():
        eps = options["eps"] if options.get("eps") is not None else entry["eps"]
        swaps.append((name, HFAdaNorm(entry["size"], eps, entry["kind"] == "layernorm", options)))
    for name, norm in swaps:
        parent_name, _, attr = name.rpartition(".")
        norm.train(model.get_submodule(name).training)
        setattr(model.get_submodule(parent_name), attr, norm)
    for name in (record.get("fold") or {}).get("added_bias", []):
        layer = model.get_submodule(name)
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))

"""hf_adanorm: AdaNorm and LayerNorm-simple (Xu et al., NeurIPS 2019) for any HF model.

    >>> report = hf_adanorm.patch_model(model, "adanorm")   # in place, reversible
    >>> hf_adanorm.unpatch_model(model)
"""

__version__ = "0.1.0"

import importlib

from .config import NormConfig
from .norms import (AdaNorm, DetachNorm, LayerNormSimple, NoNorm, RMSAdaNorm, RMSDetachNorm,
                    RMSNormSimple)
from .patch import get_patch_record, is_patched, patch_model, unpatch_model
from .registry import available_norms, register_norm
from .report import PatchReport

# Imported on first use: they pull in transformers' Trainer and accelerate (seconds).
_LAZY = {
    "save_pretrained": "checkpoint", "from_pretrained": "checkpoint", "push_to_hub": "checkpoint",
    "load_tokenizer": "checkpoint",
    "CheckpointError": "checkpoint", "PatchCallback": "callbacks",
    "NormGradientStatsCallback": "callbacks", "AdaNormMonitorCallback": "callbacks",
    "AffineDriftCallback": "callbacks", "GradualSwapCallback": "convert.callback",
    "convert_model": "convert", "ConvertArgs": "convert",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_adanorm' has no attribute {name!r}")


def __dir__():
    """Include the lazily imported names, so tab completion offers them."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    # patching
    "patch_model", "unpatch_model", "is_patched", "get_patch_record", "PatchReport", "NormConfig",
    "available_norms", "register_norm",
    # checkpoints
    "save_pretrained", "from_pretrained", "load_tokenizer", "push_to_hub", "CheckpointError",
    # converting a pretrained model (hf-adanorm convert)
    "convert_model", "ConvertArgs", "GradualSwapCallback",
    # transformers.Trainer
    "PatchCallback", "NormGradientStatsCallback", "AdaNormMonitorCallback", "AffineDriftCallback",
    # the norms themselves
    "AdaNorm", "DetachNorm", "LayerNormSimple", "NoNorm", "RMSAdaNorm", "RMSDetachNorm", "RMSNormSimple",
]

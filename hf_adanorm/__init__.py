"""hf_adanorm: AdaNorm and LayerNorm-simple (Xu et al., NeurIPS 2019) for any HF model.

    >>> report = hf_adanorm.patch_model(model, "adanorm")   # in place, reversible
    >>> hf_adanorm.unpatch_model(model)
"""

__version__ = "0.1.0"

from .config import NormConfig
from .norms import (AdaNorm, DetachNorm, LayerNormSimple, NoNorm, RMSAdaNorm, RMSDetachNorm,
                    RMSNormSimple)
from .patch import get_patch_record, is_patched, patch_model, unpatch_model
from .registry import available_norms, register_norm
from .report import PatchReport

__all__ = [
    "AdaNorm", "DetachNorm", "LayerNormSimple", "NoNorm", "NormConfig", "PatchReport",
    "RMSAdaNorm", "RMSDetachNorm", "RMSNormSimple", "available_norms", "get_patch_record",
    "is_patched", "patch_model", "register_norm", "unpatch_model",
]

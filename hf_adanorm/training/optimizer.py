"""AdamW with weight decay grouped as ``transformers.Trainer`` groups it.

Decaying every parameter, as ``AdamW(model.parameters(), weight_decay=wd)`` does, pulls the
baseline's LayerNorm gains towards 0 and its biases too, while the patched norms have no
gain or bias to decay: with ``--weight_decay > 0`` the comparison would then measure the
decay as much as the norm. Trainer decays neither biases nor anything inside a norm, and
so do we: the same rule (its name patterns and ``nn.LayerNorm``), plus every module whose
class is a torch normalisation layer or is named ``...Norm`` (RMSNorm variants of models
whose parameters are named otherwise).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

# transformers.Trainer.get_decay_parameter_names' patterns (transformers 5.x), matched
# against lower-cased parameter names.
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _norm_classes(model: nn.Module) -> tuple:
    named_norm = {type(m) for m in model.modules() if type(m).__name__.lower().endswith("norm")}
    return (*TORCH_NORMS, *named_norm)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay applies to: not biases, not inside a norm."""
    return set(get_parameter_names(model, list(_norm_classes(model)), NO_DECAY_NAME_PATTERNS))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` for the decayed parameters, 0 for the rest
    (trainable parameters only; a group left empty is dropped)."""
    decayed = decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name in decayed], "weight_decay": weight_decay},
              {"params": [p for name, p in trainable if name not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate)

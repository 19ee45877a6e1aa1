"""Memory hf_adanorm keeps beside a patched model, measured by walking everything it holds.

``python tests/test_fold_memory.py`` prints the numbers quoted in docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import hf_adanorm
from hf_adanorm.record import get_state


def llama_shaped(seed: int = 0) -> nn.Module:
    """4.2 M parameters with Llama's proportions (the issue's model): 2.7 M of them fold."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
    return model


def _held_tensors(obj, found: list, seen: set) -> None:
    """Every tensor reachable from ``obj`` through modules, containers and dataclasses."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, nn.Module):
        for value in [*obj._parameters.values(), *obj._buffers.values(), *obj._modules.values()]:
            _held_tensors(value, found, seen)
    elif isinstance(obj, dict):
        for value in obj.values():
            _held_tensors(value, found, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _held_tensors(value, found, seen)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _held_tensors(getattr(obj, f.name), found, seen)


def _storage_bytes(tensors) -> dict:
    """{device: bytes} of the distinct storages behind ``tensors``."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
    totals = {}
    for (device, _), nbytes in storages.items():
        totals[str(device)] = totals.get(str(device), 0) + nbytes
    return totals


def extra_bytes(model: nn.Module) -> dict:
    """{device: bytes} held by the model and its patch state beyond its own parameters and buffers."""
    held = []
    _held_tensors(model, held, set())
    _held_tensors(get_state(model), held, set())
    own = {(t.device, t.untyped_storage().data_ptr()) for t in model.state_dict().values()}
    return _storage_bytes([t for t in held if (t.device, t.untyped_storage().data_ptr()) not in own])


def model_bytes(model: nn.Module) -> int:
    return sum(_storage_bytes(model.state_dict().values()).values())


def measure(**options) -> tuple[int, int, int]:
    model = llama_shaped()
    before = model_bytes(model)
    hf_adanorm.patch_model(model, "layernorm_simple", include_rmsnorm=True, fold_affine=True, **options)
    folded = sum(model.get_submodule(c).weight.numel()
                 for cs in hf_adanorm.get_patch_record(model)["fold"]["folded"].values() for c in cs)
    return before, extra_bytes(model).get("cpu", 0), folded * 4


def test_fold_keeps_under_one_percent_by_default():
    before, extra, folded_bytes = measure()
    assert folded_bytes > 0.6 * before  # most of the model folds: a full copy would cost that much
    assert extra <= 0.01 * before, f"{extra} extra bytes for a {before}-byte model"


def test_exact_unfold_keeps_the_folded_layers_originals():
    before, extra, folded_bytes = measure(exact_unfold=True)
    # the originals of the folded layers (in CPU memory, the model's device here), plus small vectors
    assert folded_bytes <= extra <= folded_bytes + 0.01 * before


if __name__ == "__main__":
    for label, options in (("default", {}), ("exact_unfold=True", {"exact_unfold": True})):
        before, extra, folded_bytes = measure(**options)
        print(f"{label}: model {before / 4e6:.2f} M float32 parameters, folded layers "
              f"{folded_bytes / 4e6:.2f} M ({folded_bytes / before:.1%}); extra memory {extra} bytes "
              f"= {extra / before:.3%} of the model")

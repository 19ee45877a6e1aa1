"""Convergence: training on the fast kernels follows the paper's equations step for step.

As Liger-Kernel's convergence tests do for its kernels: the same tiny BERT, data and
optimizer, trained for 30 steps with each norm patched in, must give the same losses and
weights on the C++ CPU kernels, on torch's eager kernels, and with every patched module's
forward replaced by the plain-autograd reference of test_norms.py. And LayerNorm-simple must
train exactly like the unpatched model with its LayerNorm gains and biases frozen at 1 and 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_adanorm
from test_norms import VARIANTS, reference

STEPS = 30
CASES = {  # patch_model arguments -> the test_norms variant that is their reference
    "layernorm_simple": (("layernorm_simple", {}), "layernorm_simple"),
    "adanorm_k0.4_C2": (("adanorm", {"k": 0.4, "C": 2.0}), "adanorm_k0.4_C2"),
    "detach_mean": (("detachnorm", {"detach": "mean"}), "detach_mean"),
    "detach_variance": (("detachnorm", {"detach": "variance"}), "detach_variance"),
}


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def train(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (16, 24), generator=gen)
    labels = torch.randint(0, 3, (16,), generator=gen)
    # SGD, not Adam: Adam would blow the round-off "gradient" of parameters whose true gradient
    # is zero (attention key biases) up to full-size steps that differ between paths. A small
    # step keeps training smooth, so round-off differences do not grow chaotically.
    optimizer = torch.optim.SGD((p for p in model.parameters() if p.requires_grad), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def on_reference(model: nn.Module, variant) -> nn.Module:
    """Every patched norm computes test_norms.reference instead of hf_adanorm's kernels."""
    for module in model.modules():
        if isinstance(module, hf_adanorm.norms._ParameterFreeNorm):
            module.forward = lambda x, m=module: reference(variant, x, m.eps, m.eps_mode)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_training_on_each_path_follows_the_reference(case, cpu_kernels_mode):
    (norm, options), variant_id = CASES[case]
    variant = next(v for v in VARIANTS if v.id == variant_id)
    runs = {}
    for path, mode in (("cpu_kernels", "auto"), ("eager", "off"), ("reference", "off")):
        calls = cpu_kernels_mode(mode)
        before = calls["forward"]
        model = tiny_bert()
        hf_adanorm.patch_model(model, norm, **options)
        runs[path] = train(on_reference(model, variant) if path == "reference" else model)
        assert (calls["forward"] > before) == (path == "cpu_kernels")
    ref_losses, ref_weights = runs.pop("reference")
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # it does learn: the comparison is not vacuous
    for path, (losses, weights) in runs.items():
        torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5, msg=path)
        for name, weight in weights.items():
            torch.testing.assert_close(weight, ref_weights[name], rtol=1e-3, atol=1e-4, msg=f"{path}: {name}")


def test_layernorm_simple_trains_like_layernorm_with_frozen_unit_affine(cpu_kernels_mode):
    cpu_kernels_mode("auto")
    unpatched = tiny_bert()
    for module in unpatched.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)
            assert torch.equal(module.weight, torch.ones_like(module.weight))
    patched = tiny_bert()
    hf_adanorm.patch_model(patched, "layernorm_simple")
    losses, weights = train(patched)
    want_losses, want_weights = train(unpatched)
    torch.testing.assert_close(losses, want_losses, rtol=1e-4, atol=1e-5)
    for name, weight in weights.items():
        torch.testing.assert_close(weight, want_weights[name], rtol=1e-3, atol=1e-4, msg=name)

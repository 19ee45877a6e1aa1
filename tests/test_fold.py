"""fold_affine=True: exact folding of pretrained gains and biases, honest refusal elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hf_adanorm
from hf_adanorm.fold import folded_linear

TINY = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64),
    "opt": dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "llama": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2),
    "gptj": dict(n_layer=2, n_embd=32, n_head=2, rotary_dim=8, n_positions=64),  # parallel block
    "falcon": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_kv_heads=2,
                   ffn_hidden_size=64),  # its Linear layers are FalconLinear, a subclass of nn.Linear
}
RMS = {"llama"}


def tiny_lm(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random LM whose norms have non-trivial gains (0.5 .. 1.5) and biases (N(0, 1))."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=100, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **{**TINY[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and weight is not None and weight.dim() == 1:
                weight.copy_(0.5 + torch.rand(weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return model


def logits(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type, overrides", [
    ("gpt2", {}), ("opt", {}), ("llama", {}), ("gptj", {}), ("falcon", {}),
    ("falcon", {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2})])
def test_layernorm_simple_with_fold_keeps_logits(model_type, overrides):
    model = tiny_lm(model_type, **overrides)
    before = logits(model)
    report = hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True,
                                    include_rmsnorm=model_type in RMS)
    after = logits(model)
    assert report.replaced and all("folded into" in e.reason for e in report.replaced), str(report)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    assert fold["not_foldable"] == {}
    assert report.output_drift < 1e-5 and fold["output_drift"] == report.output_drift
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # float32 round-off
    # what the report says of the rest: the last hidden state is the last norm's output, now y
    assert all("a hidden state the model returns from this norm's output is now y" in e.reason for e in report.replaced)
    # ... while dropping the same gains and biases without folding changes the model.
    plain = tiny_lm(model_type, **overrides)
    hf_adanorm.patch_model(plain, "layernorm_simple", include_rmsnorm=model_type in RMS)
    assert (logits(plain) - before).abs().max() > 1e-2


def test_bf16_one_plus_w_gain_is_folded_in_float64():
    # Gemma's RMSNorm scales by (1 + w); in bf16, 1 + 0.003 rounds to 1.0 and the gain would be lost.
    config = AutoConfig.for_model("gemma", vocab_size=100, num_hidden_layers=1, hidden_size=32,
                                  intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight.fill_(0.003)
    w, q_proj = layer.input_layernorm.weight.detach().double(), layer.self_attn.q_proj.weight.detach().clone()
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, include_rmsnorm=True)
    expected = (q_proj.double() * (1 + w)[None, :]).to(torch.bfloat16)  # one rounding, at the end
    assert not torch.equal(expected, q_proj)
    torch.testing.assert_close(layer.self_attn.q_proj.weight.detach(), expected, rtol=0, atol=0)


class _SameAsLinear(nn.Linear):  # FalconLinear's forward, written another way
    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t()).reshape(*x.shape[:-1], -1)


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Relu(nn.Linear):
    def forward(self, x):
        return torch.relu(super().forward(x))


class _PlusOne(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1


class _Decoupled(nn.Linear):  # as Idefics' DecoupledLinear, some outputs come from elsewhere
    def forward(self, x):
        return torch.cat([super().forward(x)[..., :-2], x[..., :2]], dim=-1)


@pytest.mark.parametrize("subclass, folds", [(_SameAsLinear, True), (_Scaled, False), (_Relu, False),
                                             (_PlusOne, False), (_Decoupled, False)])
def test_a_linear_subclass_is_folded_into_only_when_it_computes_a_linear(subclass, folds):
    """Subclasses of nn.Linear were never folded into (Falcon's norms: "feeds FalconLinear, not only
    Linear layers"); one is taken for a Linear when its forward gives F.linear on a test input."""
    model = tiny_lm("opt")
    layer = model.model.decoder.layers[0]
    custom = subclass(layer.fc1.in_features, layer.fc1.out_features)
    custom.load_state_dict(layer.fc1.state_dict())
    layer.fc1 = custom
    before = logits(model)
    report = hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    entry = next(e for e in report.replaced if e.name == "model.decoder.layers.0.final_layer_norm")
    if folds:
        assert "folded into model.decoder.layers.0.fc1" in entry.reason, entry.reason
        torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    else:
        assert f"feeds model.decoder.layers.0.fc1 ({subclass.__name__}), not only Linear layers" in entry.reason


def test_parallel_block_folds_into_attention_and_mlp():
    model = tiny_lm("gptj")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    folded = hf_adanorm.get_patch_record(model)["fold"]["folded"]
    assert folded["transformer.h.0.ln_1"] == sorted(
        f"transformer.h.0.{n}" for n in ("attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_in"))


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_tied_lm_head_is_untied_and_unpatch_restores_bitwise(model_type):
    model = tiny_lm(model_type)
    embedding = model.get_input_embeddings().weight
    emb_before, before = embedding.detach().clone(), logits(model)
    assert model.lm_head.weight is embedding
    shared_config = model.config  # e.g. also used by a baseline model: must never change
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    assert fold["untied"] == ["lm_head"] and fold["added_bias"] == ["lm_head"]
    assert model.lm_head.weight is not embedding and model.config.tie_word_embeddings is False
    assert shared_config.tie_word_embeddings is True and model.config is not shared_config
    inner = model.model.decoder if model_type == "opt" else model.transformer
    assert inner.config is model.config  # every module sees the model's own copy
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # embeddings untouched
    hf_adanorm.unpatch_model(model)
    assert torch.equal(logits(model), before)
    assert model.lm_head.weight is embedding and model.lm_head.bias is None
    assert model.config is shared_config and inner.config is shared_config
    assert model.config.tie_word_embeddings is True


def test_post_ln_opt_reports_not_foldable_with_drift():
    model = tiny_lm("opt", do_layer_norm_before=False)  # OPT-350m style
    linears = {k: v.clone() for k, v in model.state_dict().items() if "layer_norm" not in k}
    report = hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    refused = fold["not_foldable"]
    assert "model.decoder.layers.0.self_attn_layer_norm" in refused
    for name, entry in refused.items():
        assert entry["drift"] > 1e-2 and entry["reason"]
        assert f"not foldable: {entry['reason']}" in next(e.reason for e in report.replaced if e.name == name)
    # The last layer's final_layer_norm feeds only the LM head: that one does fold.
    assert list(fold["folded"]) == ["model.decoder.layers.1.final_layer_norm"]
    assert report.output_drift > 1e-2
    untouched = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    assert all(torch.equal(untouched[k], v) for k, v in linears.items() if k in untouched)


def test_pretrained_minilm_post_ln_is_not_foldable(minilm, minilm_inputs):
    with torch.no_grad():
        before = minilm(**minilm_inputs).last_hidden_state
    weights = {k: v.clone() for k, v in minilm.state_dict().items() if "LayerNorm" not in k}
    report = hf_adanorm.patch_model(minilm, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(minilm)["fold"]
    assert fold["folded"] == {} and len(fold["not_foldable"]) == 13
    assert all(e["drift"] > 1e-2 for e in fold["not_foldable"].values())
    assert "model's output" in fold["not_foldable"]["encoder.layer.5.output.LayerNorm"]["reason"]
    assert all("not foldable" in e.reason for e in report.replaced)
    with torch.no_grad():
        after = minilm(**minilm_inputs).last_hidden_state
    assert report.output_drift > 0.1 and (after - before).abs().max() > 0.1
    assert all(torch.equal(minilm.state_dict()[k], v) for k, v in weights.items())
    hf_adanorm.unpatch_model(minilm)
    with torch.no_grad():
        assert torch.equal(minilm(**minilm_inputs).last_hidden_state, before)


@pytest.mark.parametrize("layer_cls", [nn.Linear, Conv1D])
def test_folded_linear_matches_the_formula(layer_cls):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4) if layer_cls is nn.Linear else Conv1D(4, 6)
    gain, bias = torch.rand(6) + 0.5, torch.randn(6)
    y = torch.randn(5, 6)
    weight, new_bias = folded_linear(layer, gain, bias)
    folded = nn.Linear(6, 4) if layer_cls is nn.Linear else Conv1D(4, 6)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(new_bias)
    torch.testing.assert_close(folded(y), layer(y * gain + bias), rtol=1e-6, atol=1e-6)


def test_unpatch_refuses_when_folded_layers_were_trained():
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 100, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trained = logits(model)
    with pytest.raises(RuntimeError, match="discard"):
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model) and torch.equal(logits(model), trained)


def test_dry_run_reports_folds_and_changes_nothing(state_of, assert_unchanged):
    model = tiny_lm("gpt2")
    model.train()
    before = state_of(model)
    report = hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, dry_run=True)
    assert all("folded into" in e.reason for e in report.replaced)
    assert_unchanged(model, before)


def test_meta_model_is_refused_before_anything_changes(state_of, assert_unchanged):
    config = AutoConfig.for_model("gpt2", vocab_size=100, **TINY["gpt2"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    before = state_of(model)
    with pytest.raises(ValueError, match="meta"):
        hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    assert_unchanged(model, before)


def test_training_flags_survive_the_probe():
    model = tiny_lm("opt")
    model.train()
    model.model.decoder.layers[0].eval()
    flags = [m.training for m in model.modules()]
    hf_adanorm.patch_model(model, "adanorm", fold_affine=True)
    assert [m.training for m in model.modules()] == flags


def test_vision_and_encoder_decoder_models_are_probed():
    """Pixel inputs (ViT, pre-LN) and decoder inputs (BART, post-LN) get a probe batch too."""
    from transformers import AutoModelForImageClassification, AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    vit = AutoModelForImageClassification.from_config(AutoConfig.for_model(
        "vit", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3)).eval()
    hf_adanorm.patch_model(vit, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(vit)["fold"]
    assert sorted(fold["folded"]) == [f"vit.layers.{i}.{n}" for i in range(2)
                                      for n in ("layernorm_after", "layernorm_before")]
    assert list(fold["not_foldable"]) == ["vit.layernorm"]  # the classifier reads only [CLS]
    bart = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(
        "bart", vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()
    report = hf_adanorm.patch_model(bart, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(bart)["fold"]
    # Post-LN: only a stack's last norm feeds Linear layers alone (cross-attention k/v, LM head).
    assert fold["folded"] == {
        "model.encoder.layers.0.final_layer_norm": ["model.decoder.layers.0.encoder_attn.k_proj",
                                                    "model.decoder.layers.0.encoder_attn.v_proj"],
        "model.decoder.layers.0.final_layer_norm": ["lm_head"]}
    assert len(fold["not_foldable"]) == len(report.replaced) - 2

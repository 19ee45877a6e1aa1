"""PEFT on a patched model: LN tuning is refused with a reason, the alternative it names works;
unpatching under LoRA adapters on folded layers is refused, changing nothing.

Skipped without ``peft`` (in the ``test`` extra).
"""

from __future__ import annotations

import pytest
import torch

import hf_adanorm
from test_fold import logits, tiny_lm

peft = pytest.importorskip("peft", reason="pip install hf_adanorm[test] (peft)")


def tiny_bert():
    from transformers import AutoModelForSequenceClassification, BertConfig
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("inference_mode", [False, True])
def test_ln_tuning_on_a_patched_model_says_why_and_what_to_do(inference_mode, state_of, assert_unchanged):
    model = tiny_bert()
    hf_adanorm.patch_model(model, "adanorm")
    before = state_of(model)
    config = peft.LNTuningConfig(target_modules=["LayerNorm"], inference_mode=inference_mode)
    with pytest.raises(TypeError, match=r"LN tuning .* hf_adanorm's AdaNorm, which has no parameters to tune.*"
                                        r"LoraConfig.*hf_adanorm.unpatch_model\(model\)"):
        peft.get_peft_model(model, config)
    assert_unchanged(model, before)


def test_the_alternatives_work():
    """LoRA on the patched model trains; LN tuning of the unpatched model finds its LayerNorms."""
    model = tiny_bert()
    hf_adanorm.patch_model(model, "layernorm_simple")
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], r=2))
    ids = torch.randint(1, 64, (2, 6))
    lora(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad and p.grad is not None]
    assert trained and all("lora_" in n or "classifier" in n for n in trained)

    plain = tiny_bert()
    tuned = peft.get_peft_model(plain, peft.LNTuningConfig(target_modules=["LayerNorm"]))
    assert any("ln_tuning" in n and p.requires_grad for n, p in tuned.named_parameters())


def test_other_wrappers_still_take_the_norms():
    """The refusal is for PEFT's LN tuning only: any other module may hold these norms."""
    holder = torch.nn.Module()
    holder.norm = hf_adanorm.AdaNorm(8)
    holder.seq = torch.nn.Sequential(hf_adanorm.LayerNormSimple(8))
    assert isinstance(holder.seq[0], hf_adanorm.LayerNormSimple)


@pytest.mark.parametrize("model_type, target", [("llama", "v_proj"), ("gpt2", "c_attn")])  # Linear, Conv1D
def test_unpatch_under_lora_on_folded_layers_says_what_to_do_and_changes_nothing(model_type, target, state_of,
                                                                                 assert_unchanged):
    reference = tiny_lm(model_type)
    model = tiny_lm(model_type)
    hf_adanorm.patch_model(model, "layernorm_simple", include_rmsnorm=True, fold_affine=True, exact_unfold=True)
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=[target], r=2,
                                                      fan_in_fan_out=model_type == "gpt2"))
    before, out = state_of(model), logits(model)
    with pytest.raises(RuntimeError, match=rf"{target} .* wrapped since .*base_layer.* peft_model.unload\(\)"):
        hf_adanorm.unpatch_model(lora.get_base_model())
    assert_unchanged(model, before)  # no layer un-folded, no stray parameter on a wrapper
    assert hf_adanorm.is_patched(model) and torch.equal(logits(model), out)
    plain = lora.unload()  # what the message says to do
    hf_adanorm.unpatch_model(plain)
    assert torch.equal(logits(plain), logits(reference))


def test_saving_with_lora_layers_injected_is_refused_before_writing(tmp_path):
    """The injected layers' base_layer / lora_A keys do not fit the saved stock architecture: reloading
    gave random weights in their place. Merged (merge_and_unload) it saves and reloads."""
    from transformers import AutoModelForCausalLM
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["c_attn"], r=4, init_lora_weights=False))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    for save in (lambda: hf_adanorm.save_pretrained(peft_model.get_base_model(), tmp_path / "ckpt"),
                 lambda: peft_model.get_base_model().save_pretrained(tmp_path / "ckpt")):
        with pytest.raises(ValueError, match=r"PEFT adapter layers \(transformer\.h\.0\.attn\.c_attn, .*"
                                             r"merge_and_unload\(\).*unload\(\)"):
            save()
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["tokenizer.json"]
    expected = logits(peft_model)
    merged = peft_model.merge_and_unload()
    hf_adanorm.save_pretrained(merged, tmp_path / "ckpt")
    loaded = hf_adanorm.from_pretrained(AutoModelForCausalLM, tmp_path / "ckpt").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)

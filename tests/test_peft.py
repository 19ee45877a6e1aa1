"""PEFT on a patched model: LN tuning is refused with a reason, the alternative it names works;
unpatching under LoRA adapters on folded layers is refused, changing nothing; a PeftModel of a patched
model is patched for is_patched, the monitors, PatchCallback and its checkpoints and resumes.

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


# --------------------------------------------------------------------------- a PeftModel of a patched model
def lora_of_patched(norm="adanorm", **options):
    """(patched base model, PeftModel around it): the supported order, patch first, then get_peft_model."""
    model = tiny_bert()
    hf_adanorm.patch_model(model, norm, **options)
    return model, peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], r=2))


def train_args(output_dir, **overrides):
    from transformers import TrainingArguments
    settings = dict(per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True,
                    logging_steps=1000, save_strategy="no", max_steps=2, seed=0)
    return TrainingArguments(str(output_dir), **{**settings, **overrides})


def test_is_patched_and_the_record_look_through_the_peft_model(state_of, assert_unchanged):
    """A PeftModel of a patched model computes the patched norms: it is patched, with the inner model's
    record (whose names are the inner model's); unpatch_model says which model to unpatch."""
    model, lora = lora_of_patched()
    assert hf_adanorm.is_patched(lora) and hf_adanorm.get_patch_record(lora) is hf_adanorm.get_patch_record(model)
    before = state_of(model)
    with pytest.raises(ValueError, match=r"PeftModel around a patched model.*"
                                         r"unpatch_model\(peft_model\.get_base_model\(\)\).*merge_and_unload\(\)"):
        hf_adanorm.unpatch_model(lora)
    assert_unchanged(model, before)
    hf_adanorm.unpatch_model(lora.get_base_model())  # what the message says: the adapters stay
    assert not hf_adanorm.is_patched(lora) and any("lora_A" in n for n, _ in lora.named_parameters())


@pytest.mark.parametrize("norm, options", [("adanorm", {}), ("layernorm_simple", {"eps_mode": "fairseq"}),
                                           ("no_norm", {}), ("detachnorm", {"detach": "mean"})])
def test_the_gradient_probe_finds_the_patched_norms_inside_a_peft_model(norm, options):
    """They were looked for under the PeftModel's names (base_model.model.<name>), which the record
    lacks: AdaNorm, NoNorm and fairseq-eps norms were not found, the others measured as stock LayerNorms."""
    from hf_adanorm.grad_stats import find_norm_sites
    model, lora = lora_of_patched(norm, **options)
    assert find_norm_sites(lora) == find_norm_sites(model) and len(find_norm_sites(model)) == 3


def test_the_monitors_measure_every_norm_of_a_peft_model_under_its_own_names(token_dataset, tmp_path):
    """One LayerNorm left unpatched: the gradient statistics were of that one only ('all' included),
    silently; now every norm is measured, under the names a run without PEFT logs."""
    from transformers import Trainer
    from hf_adanorm.callbacks import AdaNormMonitorCallback, AffineDriftCallback, NormGradientStatsCallback
    _, lora = lora_of_patched("adanorm", exclude=["attention.output.LayerNorm"])
    trainer = Trainer(lora, train_args(tmp_path, logging_steps=1), train_dataset=token_dataset,
                      callbacks=[NormGradientStatsCallback(every_n_steps=1), AdaNormMonitorCallback(every_n_steps=1),
                                 AffineDriftCallback(every_n_steps=1)])
    trainer.train()
    logged = set().union(*trainer.state.log_history)
    patched, kept = "bert.encoder.layer.0.output.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm"
    assert {f"norm_grad/{patched}/recentring", f"norm_grad/{kept}/recentring", f"adanorm/{patched}/factor_min",
            f"affine/{kept}/gain_dev"} <= logged
    assert not any("base_model.model" in key for key in logged)
    last = [logs for logs in trainer.state.log_history if f"norm_grad/{patched}/recentring" in logs][-1]
    assert last[f"norm_grad/{patched}/recentring"] < 1e-3  # AdaNorm re-centres (theory: 0)


def test_patch_callback_on_a_peft_model_of_the_patched_model(token_dataset, tmp_path):
    """The same patch is left alone (it raised the TypeError for patching a PeftModel, whose advice had
    been followed); another patch is refused; checkpoints carry the record, and a resume checks it."""
    import json
    from transformers import Trainer
    from hf_adanorm.callbacks import PATCH_RECORD_FILE, PatchCallback
    _, lora = lora_of_patched("adanorm", k=0.2)
    with pytest.raises(RuntimeError, match=r"already patched with .*'k': 0\.2.*not .*'k': 0\.1.*"
                                           r"unpatch_model\(peft_model\.get_base_model\(\)\)"):
        Trainer(lora, train_args(tmp_path), train_dataset=token_dataset, callbacks=[PatchCallback("adanorm")])
    args = train_args(tmp_path, save_strategy="steps", save_steps=1)
    Trainer(lora, args, train_dataset=token_dataset, callbacks=[PatchCallback("adanorm", k=0.2)]).train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").exists()
    assert json.loads((checkpoint / PATCH_RECORD_FILE).read_text()) == hf_adanorm.get_patch_record(lora)

    _, other = lora_of_patched("adanorm", k=0.3)  # resumed with another patch: its adapters would continue
    resumed = Trainer(other, args, train_dataset=token_dataset, callbacks=[PatchCallback("adanorm", k=0.3)])
    with pytest.raises(RuntimeError, match=r"resumed from .*checkpoint-1 was patched with .*'k': 0\.2.*'k': 0\.3"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    _, same = lora_of_patched("adanorm", k=0.2)
    Trainer(same, args, train_dataset=token_dataset,
            callbacks=[PatchCallback("adanorm", k=0.2)]).train(resume_from_checkpoint=str(checkpoint))


def test_from_pretrained_on_an_adapter_folder_says_what_to_load(tmp_path):
    """A PEFT run's checkpoint holds adapters only: the message said to upgrade transformers."""
    from transformers import AutoModelForSequenceClassification
    model = tiny_bert()
    hf_adanorm.patch_model(model, "adanorm")
    hf_adanorm.save_pretrained(model, tmp_path / "base")
    base = hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"], r=2))
    lora.save_pretrained(tmp_path / "adapters", save_embedding_layers=False)
    with pytest.raises(hf_adanorm.CheckpointError, match=r"holds PEFT adapters.*hf_adanorm\.from_pretrained\("
                                                         r"model_class, '[^']*base'\), then peft\.PeftModel\."):
        hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "adapters")
    # adapters of a stock model patched in memory: its folder is no patched checkpoint, so it is not named
    from transformers import BertForSequenceClassification
    stock = tiny_bert()
    stock.save_pretrained(tmp_path / "stock")
    stock = BertForSequenceClassification.from_pretrained(tmp_path / "stock")
    hf_adanorm.patch_model(stock, "adanorm")
    peft.get_peft_model(stock, peft.LoraConfig(target_modules=["query", "value"], r=2)).save_pretrained(
        tmp_path / "stock_adapters")
    with pytest.raises(hf_adanorm.CheckpointError, match=r"was patched in memory: load that model, patch it as it "
                                                         r"was .*hf_adanorm_patch\.json.*without an error"):
        hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "stock_adapters")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf_adanorm.CheckpointError, match="has no config.json"):
        hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "empty")
    reloaded = peft.PeftModel.from_pretrained(  # what the message says to do
        hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "base"), tmp_path / "adapters")
    ids = torch.randint(1, 64, (2, 6))
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, lora.eval()(input_ids=ids).logits)


# --------------------------------------------------------------------------- PEFT on a loaded checkpoint
def test_a_lora_run_on_a_loaded_checkpoint_saves_with_peft_defaults(token_dataset, tmp_path):
    """PEFT's save_pretrained re-reads the base folder through type(model.config) to compare vocabulary
    sizes; the folder's guard refused the stock class ("Validation error for field 'hidden_size'"), so
    every Trainer checkpoint of a LoRA run on a converted model failed. The adapters now save with the
    defaults, and reload onto the same base to the same outputs."""
    from transformers import AutoModelForSequenceClassification, Trainer
    model = tiny_bert()
    hf_adanorm.patch_model(model, "adanorm")
    hf_adanorm.save_pretrained(model, tmp_path / "base")
    base = hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"], r=2, init_lora_weights=False))
    Trainer(lora, train_args(tmp_path / "run", save_strategy="steps", save_steps=1),
            train_dataset=token_dataset).train()
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    lora.save_pretrained(tmp_path / "adapters")  # save_embedding_layers="auto"
    reloaded = peft.PeftModel.from_pretrained(
        hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "base"), tmp_path / "adapters")
    ids = torch.randint(1, 64, (2, 6))
    expected = lora.eval()(input_ids=ids).logits
    with lora.disable_adapter():  # the adapters change the output, so the comparison below sees them
        assert not torch.allclose(lora(input_ids=ids).logits, expected)
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected)


def test_the_loaded_config_reads_its_folder_and_nothing_else_changes(tmp_path):
    """Only get_config_dict differs: the same name (the Auto classes look classes up by name), an
    instance of the stock class, the same config.json when saved again, pickles; the stock class still
    refuses the folder, so no stock load builds the model without its patch."""
    import copy
    import json
    import pickle
    from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, BertModel
    model = tiny_bert()
    hf_adanorm.patch_model(model, "adanorm")
    hf_adanorm.save_pretrained(model, tmp_path / "saved")
    loaded = hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "saved")
    config = loaded.config
    assert type(config) is not BertConfig and isinstance(config, BertConfig) and type(config).__name__ == "BertConfig"
    reread = type(config).from_pretrained(tmp_path / "saved")
    assert reread.hidden_size == 32 and reread.vocab_size == 64 and reread.model_type == "bert"
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert type(copied) is type(config) and copied.to_dict() == config.to_dict()
    assert type(AutoModel.from_config(config)).__name__ == "BertModel"
    hf_adanorm.save_pretrained(loaded, tmp_path / "again")
    assert (json.loads((tmp_path / "again" / "config.json").read_text())
            == json.loads((tmp_path / "saved" / "config.json").read_text()))
    with pytest.raises(Exception, match="not a stock transformers checkpoint"):
        BertConfig.from_pretrained(tmp_path / "saved")
    with pytest.raises(Exception, match="not a stock transformers checkpoint"):
        BertModel.from_pretrained(tmp_path / "saved")


def test_a_compiled_patched_model_is_measured_under_its_own_names():
    """Patch, then wrap (the documented order): torch.compile's wrapper hid the patched norms from the
    monitors, so with one LayerNorm left unpatched only that one was measured ('all' included), silently,
    under '_orig_mod.' names."""
    from hf_adanorm.grad_stats import find_norm_sites
    model = tiny_bert()
    hf_adanorm.patch_model(model, "adanorm", exclude=["embeddings.LayerNorm"])
    compiled = torch.compile(model, backend="eager")
    sites = [(s.name, s.module) for s in find_norm_sites(compiled)]
    assert sites == [(s.name, s.module) for s in find_norm_sites(model)] and len(sites) == 3
    assert hf_adanorm.is_patched(compiled) and hf_adanorm.get_patch_record(compiled) is hf_adanorm.get_patch_record(model)

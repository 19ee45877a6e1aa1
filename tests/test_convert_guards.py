"""A conversion never writes over its own inputs, never resumes from a checkpoint another conversion
wrote, and never calls a swap exact that is not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_adanorm.convert import convert_model

from test_recipes import write_sentiment_csvs
from test_convert import _args, _interrupt_after_first_checkpoint, _snapshot, workspace  # noqa: F401
from test_mixed_precision import fresh_accelerate_state  # noqa: F401 - accelerate keeps one state per process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", ["model inside output_dir", "output_dir is the model", "output_dir/model links to it",
                                    "text inside output_dir"])
def test_an_input_that_the_conversion_would_write_over_is_refused_and_nothing_changes(workspace, tmp_path,  # noqa: F811
                                                                                      layout):
    home = tmp_path / "home"
    shutil.copytree(workspace / "bert", home / "model")  # named like the conversion's output: the save replaces it
    args = dict(model=str(home / "model"), dataset=str(workspace / "texts.txt"), out=home)
    option = "--model"
    if layout == "output_dir is the model":
        args["out"] = home / "model"
    elif layout == "output_dir/model links to it":
        shutil.move(home / "model", tmp_path / "teacher")
        args.update(model=str(tmp_path / "teacher"), out=tmp_path / "out")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "model").symlink_to(tmp_path / "teacher", target_is_directory=True)
        home = tmp_path
    elif layout == "text inside output_dir":
        shutil.copy(workspace / "texts.txt", home / "texts.txt")
        args.update(model=str(workspace / "bert"), dataset=str(home / "texts.txt"))
        option = "--dataset"
    before = _snapshot(home)
    with pytest.raises(ValueError, match=f"the {option} .* which this conversion writes .*pass an --output_dir "
                                         "elsewhere"):
        convert_model(_args(workspace, args.pop("out"), max_steps=4, **args))
    assert _snapshot(home) == before


def test_a_checkpoint_another_conversion_wrote_is_refused(workspace, tmp_path, monkeypatch):  # noqa: F811
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        for name, norm in (("a", "adanorm"), ("b", "layernorm_simple")):
            with pytest.raises(KeyboardInterrupt):
                convert_model(_args(workspace, tmp_path / name, norm=norm, max_steps=12, checkpointing_steps=5))
    foreign = tmp_path / "b" / "checkpoints" / "step_5"
    before = _snapshot(tmp_path / "a")
    with pytest.raises(ValueError, match="norm: 'layernorm_simple' -> 'adanorm'"):
        convert_model(_args(workspace, tmp_path / "a", max_steps=12, checkpointing_steps=5,
                            resume_from_checkpoint=str(foreign)))
    assert _snapshot(tmp_path / "a") == before
    # one that records no options (written before checkpoints kept them) is trusted only in its own folder
    state_file = foreign / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("run")["args"]["norm"] == "layernorm_simple"
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="records no options and is not a checkpoint of"):
        convert_model(_args(workspace, tmp_path / "a", max_steps=12, checkpointing_steps=5,
                            resume_from_checkpoint=str(foreign)))
    assert _snapshot(tmp_path / "a") == before
    # its own checkpoint, by path, resumes
    own = tmp_path / "a" / "checkpoints" / "step_5"
    resumed = convert_model(_args(workspace, tmp_path / "a", max_steps=12, checkpointing_steps=5,
                                  resume_from_checkpoint=str(own)))
    assert resumed["resumed_from"] == str(own) and resumed["steps"] == 12


def test_a_swap_that_changes_the_function_is_never_called_exact(workspace, tmp_path):  # noqa: F811
    """A GPT-2 whose predictions are nearly flat has a next-token KL under any threshold after AdaNorm's
    swap, though AdaNorm changes what it computes: the conversion must still train."""
    tokenizer = AutoTokenizer.from_pretrained(workspace / "gpt2")
    flat = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.002, pad_token_id=tokenizer.pad_token_id))
    flat.save_pretrained(tmp_path / "flat")
    tokenizer.save_pretrained(tmp_path / "flat")
    args = _args(workspace, tmp_path / "out", model="gpt2", max_steps=3, eval_every=3)
    args.model = str(tmp_path / "flat")
    result = convert_model(args)
    assert result["naive"]["kl"] < 1e-6, "the fixture should be flat enough to pass a KL threshold"
    assert result["naive"]["layer_cosine"][-1] < 0.999  # yet the swap changed the hidden states
    assert not result["exact_without_training"] and result["steps"] == 3
    assert "no training was needed" not in (tmp_path / "out" / "conversion.md").read_text()


def _save_again_changed(folder):
    """The model at ``folder`` saved again with one weight changed, as further fine-tuning would."""
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[5] += 0.1
    model.save_pretrained(folder)


def test_a_teacher_saved_again_at_its_path_is_not_resumed_from_its_old_checkpoint(workspace, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    shutil.copytree(workspace / "bert", tmp_path / "bert")
    args = dict(max_steps=12, checkpointing_steps=5)
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            convert_model(_args(tmp_path, tmp_path / "out", dataset=str(workspace / "texts.txt"), **args))
    _save_again_changed(tmp_path / "bert")
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ValueError, match="another version of .*bert: its config or weight files have changed"):
        convert_model(_args(tmp_path, tmp_path / "out", dataset=str(workspace / "texts.txt"), **args))
    assert _snapshot(tmp_path / "out") == before


@pytest.mark.slow
def test_compare_does_not_reuse_a_conversion_of_an_older_teacher(workspace, tmp_path):  # noqa: F811
    from hf_adanorm.compare import compare
    from hf_adanorm.convert.fingerprint import model_fingerprint
    shutil.copytree(workspace / "bert", tmp_path / "bert")
    setup = {"model": str(tmp_path / "bert"), "dataset": str(write_sentiment_csvs(tmp_path / "data")),
             "num_epochs": 1, "per_device_batch_size": 8, "max_length": 16, "save_model": False,
             "max_train_samples": 16, "max_eval_samples": 8}
    sweep = dict(norms=["layernorm", "adanorm"], seeds=[0], output_dir=tmp_path / "sweep", progress=False,
                 conversion={"max_steps": 2, "eval_every": 2})
    compare(setup, **sweep)
    (result,) = (tmp_path / "sweep" / "conversions").glob("*/conversion.json")
    old = json.loads(result.read_text())["teacher_fingerprint"]
    assert old == model_fingerprint(tmp_path / "bert")
    # a tokenizer of its own is part of what the conversion was made from: a rerun reuses it all
    shutil.copytree(workspace / "bert", tmp_path / "tokenizer")
    own_tokenizer = dict(sweep, output_dir=tmp_path / "sweep-tok")
    compare(dict(setup, tokenizer=str(tmp_path / "tokenizer")), **own_tokenizer)
    (converted,) = (tmp_path / "sweep-tok" / "conversions").glob("*/conversion.json")
    stamp = converted.stat().st_mtime_ns
    compare(dict(setup, tokenizer=str(tmp_path / "tokenizer")), **own_tokenizer)
    assert converted.stat().st_mtime_ns == stamp
    _save_again_changed(tmp_path / "bert")
    before = _snapshot(tmp_path / "sweep")
    # sweep.json records the model's fingerprint: no run of the old model is reused, baseline included
    for others in ({}, {"norms": ["layernorm"]}, {"norms": ["layernorm", "layernorm_simple"]}):
        with pytest.raises(ValueError, match=r"runs made from another version of .*bert.*overwrite_output_dir"):
            compare(setup, **{**sweep, **others})
    # a sweep from before it did: the conversion's own fingerprint still refuses the stale conversion
    recorded = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert recorded.pop("model_fingerprint") == old
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(recorded))
    before = _snapshot(tmp_path / "sweep")
    with pytest.raises(ValueError, match="adanorm conversion .*another version of .*overwrite_output_dir"):
        compare(setup, **sweep)
    assert _snapshot(tmp_path / "sweep") == before
    # a refused fresh start deletes nothing: convert checks its inputs before clearing its folder
    with pytest.raises(ValueError, match="max_length"):
        compare(dict(setup, max_length=100000), **sweep, overwrite=True)
    assert result.is_file() and json.loads(result.read_text())["teacher_fingerprint"] == old
    # afresh means the conversions too: the arm then starts from the teacher as it is now
    compare(setup, **sweep, overwrite=True)
    new = json.loads(result.read_text())["teacher_fingerprint"]
    assert new == model_fingerprint(tmp_path / "bert") != old


def test_a_model_with_a_task_head_is_refused_unless_its_base_model_is_asked_for(workspace, tmp_path):  # noqa: F811
    from transformers import BertConfig, BertForTokenClassification
    config = BertConfig.from_pretrained(workspace / "bert", num_labels=2)
    BertForTokenClassification(config).save_pretrained(tmp_path / "tagger")
    AutoTokenizer.from_pretrained(workspace / "bert").save_pretrained(tmp_path / "tagger")
    args = _args(workspace, tmp_path / "out", max_steps=2, eval_every=2)
    args.model = str(tmp_path / "tagger")
    with pytest.raises(ValueError, match=r"fine-tuned for a task \(BertForTokenClassification\).*Pass --model_class base"):
        convert_model(args)
    assert not (tmp_path / "out").exists()
    args.model_class = "base"  # asked for: the encoder is converted, the head left behind
    result = convert_model(args)
    assert result["steps"] == 2 and (tmp_path / "out" / "model" / "model.safetensors").is_file()
    # a pretraining head (masked LM) is what fine-tuning drops anyway: converted as its base model
    from transformers import BertForMaskedLM
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(workspace / "bert").save_pretrained(tmp_path / "mlm")
    args = _args(workspace, tmp_path / "mlm-out", max_steps=2, eval_every=2)
    args.model = str(tmp_path / "mlm")
    assert convert_model(args)["objective"] == "hidden"


def test_a_blank_eval_dataset_is_named_as_the_blank_one(workspace, tmp_path):  # noqa: F811
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ValueError, match=r"validation text of --eval_dataset '.*blank.txt' is empty"):
        convert_model(_args(workspace, tmp_path / "out", eval_dataset=str(tmp_path / "blank.txt")))
    assert not (tmp_path / "out").exists()


def test_a_conversion_that_ends_farther_than_the_naive_swap_says_so(workspace, tmp_path):  # noqa: F811
    args = _args(workspace, tmp_path / "out", max_steps=4, eval_every=4, learning_rate=1000.0, warmup_steps=0)
    with pytest.warns(UserWarning, match="farther from the original than the naive swap"):
        result = convert_model(args)
    # farther, or diverged to NaN (the figure then compares as neither): both are flagged
    assert not result["converted"]["embedding_cosine"] >= result["naive"]["embedding_cosine"]
    assert result["worse_than_naive"]
    assert "farther from the original than the naive swap" in (tmp_path / "out" / "conversion.md").read_text()


def test_an_encoder_decoder_that_needs_decoder_inputs_is_refused_clearly(workspace, tmp_path):  # noqa: F811
    from transformers import T5Config, T5Model
    tokenizer = AutoTokenizer.from_pretrained(workspace / "bert")
    T5Model(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                     pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)
            ).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    args = _args(workspace, tmp_path / "out", max_steps=2, include_rmsnorm=True, model_class="base")
    args.model = str(tmp_path / "t5")
    with pytest.raises(ValueError, match="does not run on token ids alone .*T5 and other encoder-decoders"):
        convert_model(args)
    assert not (tmp_path / "out").exists()


def test_a_hub_models_cached_snapshot_linked_into_the_output_is_refused(workspace, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    shutil.copytree(workspace / "bert", snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # a hub cache that holds org/tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").symlink_to(snapshot, target_is_directory=True)
    before = _snapshot(snapshot)
    args = _args(workspace, tmp_path / "out", max_steps=2)
    args.model = "org/tiny"
    with pytest.raises(ValueError, match="the --model org/tiny is .*abc, which this conversion writes"):
        convert_model(args)
    assert _snapshot(snapshot) == before


def test_a_path_with_dotdot_after_a_link_is_refused_not_read_as_text(workspace, tmp_path):  # noqa: F811
    from hf_adanorm.convert import ConvertArgs
    (tmp_path / "far" / "sub").mkdir(parents=True)
    shutil.copytree(workspace / "bert", tmp_path / "far" / "bert")   # what the kernel reaches
    shutil.copytree(workspace / "bert", tmp_path / "bert")           # what 'link/..' reads as
    (tmp_path / "link").symlink_to(tmp_path / "far" / "sub", target_is_directory=True)
    with pytest.raises(ValueError, match=r"leads to .*far/bert, but reads as .*(?<!far)/bert .*a '\.\.' after a link"):
        ConvertArgs(model=str(tmp_path / "link" / ".." / "bert"), dataset="x", output_dir=str(tmp_path / "o"))


def test_which_architectures_are_task_models():
    from types import SimpleNamespace

    from hf_adanorm.convert.inputs import task_head
    for name in ("BertForSequenceClassification", "XLMForQuestionAnsweringSimple", "GPT2DoubleHeadsModel",
                 "RobertaForTokenClassification", "BertForMultipleChoice"):
        assert task_head(SimpleNamespace(architectures=[name])) == name
    for name in ("BertModel", "BertForMaskedLM", "ElectraForPreTraining", "BartForConditionalGeneration",
                 "GPT2LMHeadModel", "LlamaForCausalLM"):
        assert task_head(SimpleNamespace(architectures=[name])) is None
    assert task_head(SimpleNamespace(architectures=None)) is None


def test_compare_convert_refuses_a_model_fine_tuned_for_a_task(workspace, tmp_path):  # noqa: F811
    from transformers import BertConfig, BertForSequenceClassification

    from hf_adanorm.compare.conversions import plan_conversions
    BertForSequenceClassification(BertConfig.from_pretrained(workspace / "bert")).save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match=r"fine-tuned for a task \(BertForSequenceClassification\).*fresh head"):
        plan_conversions({"model": str(tmp_path / "clf"), "dataset": "x"}, ["layernorm", "adanorm"], tmp_path, {})


def test_noise_near_zero_is_not_called_farther_than_the_naive_swap():
    from hf_adanorm.convert.loop import _clearly_farther
    assert not _clearly_farther({"kl": 1.3e-8}, {"kl": 9.5e-9})
    assert _clearly_farther({"kl": 0.5}, {"kl": 0.01})
    assert not _clearly_farther({"embedding_cosine": 0.945}, {"embedding_cosine": 0.95})
    assert _clearly_farther({"embedding_cosine": 0.9}, {"embedding_cosine": 0.95})
    # a diverged conversion: its figures are NaN, which compares as not farther
    assert _clearly_farther({"embedding_cosine": float("nan")}, {"embedding_cosine": 0.73})
    assert _clearly_farther({"kl": float("nan")}, {"kl": 0.01}) and _clearly_farther({"kl": float("inf")}, {"kl": 0.01})


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_checkpoint_with_a_damaged_random_state_is_refused_before_anything_changes(workspace, tmp_path,  # noqa: F811
                                                                                    monkeypatch, damage):
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            convert_model(_args(workspace, tmp_path / "out", max_steps=12, checkpointing_steps=5))
    states = tmp_path / "out" / "checkpoints" / "step_5" / "random_states_0.pkl"
    if damage == "truncated":
        states.write_bytes(states.read_bytes()[:40])
    else:
        states.unlink()
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ValueError, match="cannot resume .*step_5 exactly: the random state random_states_0.pkl lacks "
                                         "a readable file"):
        convert_model(_args(workspace, tmp_path / "out", max_steps=12, checkpointing_steps=5,
                            resume_from_checkpoint="latest"))
    assert _snapshot(tmp_path / "out") == before


def test_under_mixed_precision_the_figures_are_of_the_float32_model_that_is_saved(workspace, tmp_path,  # noqa: F811
                                                                                  fresh_accelerate_state):  # noqa: F811
    """accelerate's autocast wrapper stays on the prepared student: measured through it, an exact fold to
    LayerNorm-simple read as KL 1e-7 (bf16 rounding), as large as a good conversion's own KL."""
    result = convert_model(_args(workspace, tmp_path / "out", model="gpt2", norm="layernorm_simple",
                                 mixed_precision="bf16", max_steps=4))
    assert result["exact_without_training"]
    assert abs(result["naive"]["kl"]) < 1e-8  # float32 round-off of the fold
    # nothing was trained: the saved model is the naive swap, measured the same way
    assert result["converted"]["kl"] == pytest.approx(result["naive"]["kl"], abs=1e-12)
    assert result["converted"]["student_lm_loss"] == pytest.approx(result["converted"]["teacher_lm_loss"], abs=1e-6)


def test_a_char_level_model_is_distilled_on_text_joined_as_the_recipe_joined_it(tmp_path):
    """The recipe joins a char-level model's paragraphs with a blank line; convert joined them with [EOS],
    a token the model never saw, which inflated its measured loss and was distilled on."""
    from types import SimpleNamespace

    from hf_adanorm.checkpoint import load_tokenizer
    from hf_adanorm.convert.data import tokenize
    from hf_adanorm.training.modeling import build_vocab_tokenizer, text_separator
    paragraphs = ["It is a truth\nuniversally acknowledged.", "However little known\nthe feelings."] * 40
    built = build_vocab_tokenizer(paragraphs, "char")
    built.save_pretrained(tmp_path / "tok")
    saved = load_tokenizer(tmp_path / "tok")
    assert text_separator(built) == text_separator(saved) == "\n\n"
    assert "\n" in saved.get_vocab()
    assert text_separator(build_vocab_tokenizer(paragraphs, "word")) == "[EOS]"  # as the recipe: EOS for words
    assert text_separator(build_vocab_tokenizer(["a c g t", "t g"], "word")) == "[EOS]"  # one-letter words too
    # a character vocabulary without the newline would read a blank line as two unknown tokens: EOS then
    assert text_separator(build_vocab_tokenizer(["one line", "another"], "char")) == "[EOS]"
    data = tokenize({"train": paragraphs}, saved, SimpleNamespace(max_length=16, max_eval_samples=None), True,
                    len(saved))
    ids = {i for block in data["train"]["input_ids"] for i in block}
    assert saved.eos_token_id not in ids and saved.convert_tokens_to_ids("\n") in ids

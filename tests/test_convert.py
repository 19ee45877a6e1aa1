"""``hf-adanorm convert``: distillation reduces the drift, exact folds need no training, a killed
conversion resumes to the same model, the saved model reloads with its measured function, the
recipes and ``compare --convert`` take it, and bad input writes nothing."""

from __future__ import annotations

import json
import re
import shutil
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import hf_adanorm
from hf_adanorm.convert import ConvertArgs, convert_model
from hf_adanorm.convert.loop import measure
from hf_adanorm.convert.report import RESULT_FILE
from hf_adanorm.training.modeling import build_vocab_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "the a film movie good bad dull bright long short story actor plot scene music ending".split()


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _random_affine(model):
    """Pretrained-like norms: gains and biases far from 1 and 0, so a naive swap drifts."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny post-LN BERT and a tiny pre-LN GPT-2 saved as 'pretrained' models, and text."""
    root = tmp_path_factory.mktemp("convert")
    texts = _texts(400)
    (root / "texts.txt").write_text("\n".join(texts))
    (root / "paragraphs.txt").write_text("\n\n".join(" ".join(texts[i:i + 4]) for i in range(0, 400, 4)))
    tokenizer = build_vocab_tokenizer(texts, "word")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                      bos_token_id=tokenizer.bos_token_id))
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        _random_affine(model)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _args(workspace, out, model="bert", **overrides):
    options = dict(model=str(workspace / model), dataset=str(workspace / ("texts.txt" if model == "bert" else
                                                                            "paragraphs.txt")),
                   norm="adanorm", max_steps=40, eval_every=10, max_length=32, per_device_batch_size=16,
                   output_dir=str(out), checkpointing_steps=None)
    options.update(overrides)
    return ConvertArgs(**options)


def test_conversion_reduces_the_drift_of_an_encoder(workspace, tmp_path):
    result = convert_model(_args(workspace, tmp_path / "out", max_steps=60))
    naive, converted = result["naive"], result["converted"]
    assert result["objective"] == "hidden" and result["steps"] == 60
    assert naive["embedding_cosine"] < 0.9, "the fixture should make the naive swap drift"
    assert converted["embedding_cosine"] > naive["embedding_cosine"] + 0.05
    assert converted["layer_cosine"][-1] > naive["layer_cosine"][-1]
    assert [h["step"] for h in result["history"]] == [10, 20, 30, 40, 50, 60]
    assert result["history"][-1]["mean_alpha"] == 1.0 and result["history"][0]["mean_alpha"] < 1.0
    out = tmp_path / "out"
    for name in ("conversion.json", "conversion.md", "drift.png", "model/model.safetensors", "model/README.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    card = (out / "model" / "README.md").read_text()
    assert str(workspace / "bert") in card and "blend" in card and "embedding_cosine (after conversion)" in card


def test_converted_model_reloads_with_the_function_it_was_measured_with(workspace, tmp_path):
    out = tmp_path / "out"
    result = convert_model(_args(workspace, out, max_steps=20, max_eval_samples=12))
    loaded = hf_adanorm.from_pretrained(AutoModel, out / "model").eval()
    assert hf_adanorm.get_patch_record(loaded)["config"]["norm"] == "adanorm"
    teacher = AutoModel.from_pretrained(workspace / "bert").eval()
    # the same held-out texts, re-tokenized independently of the conversion code
    from datasets import load_dataset
    held_out = load_dataset("text", data_files=str(workspace / "texts.txt"), sample_by="line")["train"]
    held_out = held_out.train_test_split(test_size=0.05, seed=0)["test"]["text"][:12]
    tokenizer = loaded_tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(held_out, padding=True, truncation=True, max_length=32, return_tensors="pt")
    again = measure(loaded, teacher, [dict(batch)], "cpu")
    assert loaded_tokenizer is tokenizer
    for key in ("embedding_cosine", "relative_error"):
        assert again[key] == pytest.approx(result["converted"][key], abs=1e-5), key


def test_causal_lm_is_distilled_on_next_token_kl(workspace, tmp_path):
    result = convert_model(_args(workspace, tmp_path / "out", model="gpt2", max_steps=40))
    assert result["objective"] == "logits"
    assert "embedding_cosine" not in result["converted"]  # an LM's output is its logits
    assert result["converted"]["kl"] < result["naive"]["kl"]
    assert result["history"][-1]["kl"] == pytest.approx(result["converted"]["kl"], rel=1e-4)


def test_pre_ln_model_to_layernorm_simple_folds_exactly_and_needs_no_training(workspace, tmp_path):
    out = tmp_path / "out"
    result = convert_model(_args(workspace, out, model="gpt2", norm="layernorm_simple"))
    assert result["exact_without_training"] and result["steps"] == 0 and result["history"] == []
    assert abs(result["converted"]["kl"]) < 1e-6
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "gpt2").eval()
    student = hf_adanorm.from_pretrained(AutoModelForCausalLM, out / "model").eval()
    ids = torch.randint(4, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
    assert "no training was needed" in (out / "conversion.md").read_text()


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from accelerate import Accelerator
    from hf_adanorm.convert import ConvertArgs, convert_model
    original, calls = Accelerator.save_state, []
    def save_state_then_die(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the 2nd checkpoint is half written: on disk, not yet committed
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    Accelerator.save_state = save_state_then_die
    convert_model(ConvertArgs(**json.loads(sys.argv[1])))
""")


@pytest.mark.slow
def test_sigkill_mid_conversion_then_resume_equals_uninterrupted(workspace, tmp_path):
    killed = _args(workspace, tmp_path / "killed", max_steps=30, checkpointing_steps=8)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(killed.to_dict())], env=env,
                          capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step_16", "step_8"]
    assert not (tmp_path / "killed" / RESULT_FILE).exists()

    resumed = convert_model(killed)  # resume_from_checkpoint defaults to 'latest'
    assert resumed["resumed_from"] == str(checkpoints / "step_8")
    reference = convert_model(_args(workspace, tmp_path / "reference", max_steps=30, checkpointing_steps=8))
    got = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    want = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after the resume"
    assert reference["resumed_from"] is None
    assert resumed["history"] == reference["history"]
    assert resumed["converted"] == reference["converted"]


def test_resume_with_other_options_is_refused(workspace, tmp_path):
    out = tmp_path / "out"
    args = _args(workspace, out, max_steps=12, checkpointing_steps=5)
    # leave an interrupted conversion behind: checkpoints but no conversion.json
    convert_model(args)
    (out / RESULT_FILE).unlink()
    (out / "checkpoints").mkdir(exist_ok=True)
    from hf_adanorm.training.checkpoints import STATE_FILE
    (out / "checkpoints" / "step_5").mkdir()
    (out / "checkpoints" / "step_5" / STATE_FILE).write_text("{}")
    with pytest.raises(ValueError, match="learning_rate"):
        convert_model(_args(workspace, out, max_steps=12, checkpointing_steps=5, learning_rate=1e-3))


def write_random_states(checkpoint: Path) -> None:
    """The random states accelerate's save_state writes for one process, as a resume reads them."""
    import random

    import numpy as np
    from accelerate.utils import save
    save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
          "torch_manual_seed": torch.get_rng_state()}, checkpoint / "random_states_0.pkl")


def test_an_interrupted_conversion_from_before_an_option_existed_resumes_with_its_default(workspace, tmp_path):
    from hf_adanorm.convert.inputs import check_output_dir as _check_output_dir
    from hf_adanorm.convert.report import ARGS_FILE
    from hf_adanorm.training.checkpoints import STATE_FILE
    out = tmp_path / "out"
    args = _args(workspace, out, max_steps=12, checkpointing_steps=5, norm="layernorm_simple")
    out.mkdir()
    saved = args.to_dict()
    for newer in ("rescale_post_ln", "layer_loss_weight"):  # options added after that run
        del saved[newer]
    (out / ARGS_FILE).write_text(json.dumps(saved))
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / STATE_FILE).write_text("{}")
    write_random_states(out / "checkpoints" / "step_5")
    assert _check_output_dir(args) == out / "checkpoints" / "step_5"
    with pytest.raises(ValueError, match="rescale_post_ln: True -> False"):
        _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=5, norm="layernorm_simple",
                                rescale_post_ln=False))
    # an AdaNorm run from before its own defaults ran with the generic ones: resuming it with the new ones
    # would change the run half-way, so it is refused with what to pass
    saved = _args(workspace, out, max_steps=12, checkpointing_steps=5, learning_rate=2e-4).to_dict()
    del saved["layer_loss_weight"]
    (out / ARGS_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"layer_loss_weight: 1\.0 -> 10\.0"):
        _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=5, learning_rate=2e-4))
    assert _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=5, learning_rate=2e-4,
                                   layer_loss_weight=1.0)) == out / "checkpoints" / "step_5"



def test_a_resume_under_another_launch_is_refused_by_name(workspace, tmp_path):
    """An FSDP checkpoint resumed under DDP (or by another number of processes, or under another mixed
    precision from the launcher's config) would fail in accelerate's loader or deal other batches."""
    from hf_adanorm.convert.inputs import check_output_dir as _check_output_dir
    from hf_adanorm.convert.report import ARGS_FILE
    from hf_adanorm.training.checkpoints import STATE_FILE, run_record
    out = tmp_path / "out"
    args = _args(workspace, out, max_steps=12, checkpointing_steps=5, norm="layernorm_simple")
    step = out / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    (out / ARGS_FILE).write_text(json.dumps(args.to_dict()))
    (step / STATE_FILE).write_text(json.dumps({"step": 5, "run": run_record(args, 2, "bf16", "FSDP")}))
    write_random_states(step)
    shutil.copy(step / "random_states_0.pkl", step / "random_states_1.pkl")  # the second process's
    with pytest.raises(ValueError, match=r"another launch \(world_size=2 processes \(now 1\), "
                                         r"mixed_precision='bf16', from its launcher \(now 'no'\), "
                                         r"distributed_type='FSDP', from its launcher \(now 'NO'\)\)"):
        _check_output_dir(args, 1, None, "no", "NO")
    with pytest.raises(ValueError, match=r"another launch \(distributed_type='FSDP', from its launcher "
                                         r"\(now 'MULTI_CPU'\)\)"):
        _check_output_dir(args, 2, None, "bf16", "MULTI_CPU")
    assert _check_output_dir(args, 2, None, "bf16", "FSDP") == step
    # a checkpoint from before the launch was recorded is checked for what it records
    (step / STATE_FILE).write_text(json.dumps({"step": 5, "run": run_record(args, 1)}))
    assert _check_output_dir(args, 1, None, "no", "NO") == step



def test_a_resume_on_changed_text_is_refused(workspace, tmp_path):
    """Killed after a checkpoint, its text edited at the same path, the conversion went on distilling other
    text, and its report set the naive figures of the old held-out text beside the new."""
    from hf_adanorm.convert.inputs import check_output_dir as _check_output_dir
    from hf_adanorm.convert.loop import _text_fingerprint
    from hf_adanorm.convert.report import ARGS_FILE
    from hf_adanorm.training.checkpoints import STATE_FILE, run_record
    text = tmp_path / "text.txt"
    text.write_text((workspace / "texts.txt").read_text())
    out = tmp_path / "out"
    step = out / "checkpoints" / "step_5"
    step.mkdir(parents=True)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "test.txt").write_text("\n".join(text.read_text().splitlines()[:20]))
    (evaluation / "train.txt").write_text("not read: the test split is")
    args = _args(workspace, out, max_steps=12, checkpointing_steps=5, dataset=str(text), eval_dataset=str(evaluation))
    (out / ARGS_FILE).write_text(json.dumps(args.to_dict()))
    recorded = _text_fingerprint(args)
    assert recorded["dataset"] is not None and recorded["eval_dataset"] is not None
    (step / STATE_FILE).write_text(json.dumps({"step": 5, "run": {**run_record(args, 1), "data_fingerprint": recorded}}))
    write_random_states(step)
    assert _check_output_dir(args, 1, None, None, None, _text_fingerprint(args)) == step
    (evaluation / "train.txt").write_text("edited, and still not read")
    assert _check_output_dir(args, 1, None, None, None, _text_fingerprint(args)) == step
    (evaluation / "test.txt").write_text("other held-out text")
    with pytest.raises(ValueError, match=r"the files of .*eval have changed since, so going on would measure the "
                                         r"drift on data"):
        _check_output_dir(args, 1, None, None, None, _text_fingerprint(args))
    (evaluation / "test.txt").write_text("\n".join(text.read_text().splitlines()[:20]))
    text.write_text("\n".join(reversed(text.read_text().splitlines())))
    with pytest.raises(ValueError, match=r"the files of .*text.txt have changed since, so going on would distil on"):
        _check_output_dir(args, 1, None, None, None, _text_fingerprint(args))


def _snapshot(folder: Path):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", ["missing text", "empty text", "no norm matched", "k out of range",
                                  "tokenizer too big", "foreign output folder", "finished output folder"])
def test_bad_input_gets_a_clear_error_and_writes_nothing(workspace, tmp_path, case, minilm_path):
    out = tmp_path / "out"
    options = {}
    error, match = ValueError, None
    if case == "missing text":
        options["dataset"], error, match = str(tmp_path / "nothing.txt"), FileNotFoundError, "does not exist"
    elif case == "empty text":
        (tmp_path / "blank.txt").write_text("\n   \n\n")
        options["dataset"], match = str(tmp_path / "blank.txt"), "empty|too few"
    elif case == "no norm matched":
        options["include"], match = "nothing_is_called_this", "no module matched"
    elif case == "k out of range":
        with pytest.raises(ValueError, match="k"):
            _args(workspace, out, k=-1.0)
        assert not out.exists()
        return
    elif case == "tokenizer too big":
        options["tokenizer"], match = minilm_path, "embeddings: pass the model's own tokenizer"
    elif case == "foreign output folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        error, match = FileExistsError, "not a conversion's"
    else:
        convert_model(_args(workspace, out, max_steps=2))
        error, match = FileExistsError, "finished conversion"
    before = _snapshot(out)
    with pytest.raises(error, match=match):
        convert_model(_args(workspace, out, **options))
    assert _snapshot(out) == before


def test_what_a_kill_during_an_atomic_write_left_does_not_block_the_rerun(workspace, tmp_path):
    """A kill -9 while the lock's owner file, a report or the model was being written leaves a
    temporary sibling: the rerun takes the folder as its own (and a stranger's file is still refused)."""
    from hf_adanorm.training.locks import OWNER_FILE
    out = tmp_path / "out"
    out.mkdir()
    (out / f".tmp-{OWNER_FILE}").write_text('{"pid": 1')
    (out / ".tmp-conversion.json").write_text("{")
    staging = out / ".model.hf_adanorm-tmp-999999999-0123456789ab"  # a save by a process that is gone
    staging.mkdir()
    result = convert_model(_args(workspace, out, max_steps=2))
    assert result["steps"] == 2 and (out / "conversion.json").is_file()
    assert not staging.exists()  # the model's save removed it
    # a kill during the final cleanup of checkpoints/: the refusal of the finished folder says it can go
    (out / "checkpoints" / "step_1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="its checkpoints/ is what a kill during the final cleanup left"):
        convert_model(_args(workspace, out, max_steps=2))
    for stranger in (".tmp-notes.txt", ".tmp-model", ".model.hf_adanorm-tmp-mine"):  # no write of a conversion's
        (out / stranger).write_text("mine")
        with pytest.raises(FileExistsError, match=rf"not a conversion's \({re.escape(stranger)}\)"):
            convert_model(_args(workspace, out, max_steps=2, overwrite_output_dir=True))
        assert (out / stranger).read_text() == "mine"
        (out / stranger).unlink()


def test_an_output_dir_linked_to_nothing_is_refused_before_the_teacher_loads(workspace, tmp_path, monkeypatch):
    from hf_adanorm.convert import loop
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "missing")
    monkeypatch.setattr(loop, "load_teacher", lambda args: pytest.fail("the teacher was loaded"))
    with pytest.raises(FileNotFoundError, match="link to .*missing, which does not exist"):
        convert_model(_args(workspace, out, max_steps=2))
    assert not (tmp_path / "missing").exists()


def test_a_model_that_is_already_converted_is_refused(workspace, tmp_path):
    convert_model(_args(workspace, tmp_path / "first", max_steps=2))
    with pytest.raises(ValueError, match="already converted"):
        convert_model(_args(workspace, tmp_path / "second", model="bert", max_steps=2).__class__(
            **dict(_args(workspace, tmp_path / "second").to_dict(), model=str(tmp_path / "first" / "model"))))
    assert not (tmp_path / "second").exists()


def test_command_line_runs_and_refuses_bad_options(workspace, tmp_path):
    from hf_adanorm.cli import main
    assert main(["convert", "--model", str(workspace / "bert"), "--dataset", str(workspace / "texts.txt"),
                 "--norm", "layernorm", "--output_dir", str(tmp_path / "x")]) == 2
    assert main(["convert", "--model", str(workspace / "bert"), "--dataset", str(workspace / "texts.txt"),
                 "--norm", "adanorm", "--max_grad_norm", "-1", "--output_dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["convert", "--model", str(workspace / "bert"), "--dataset", str(workspace / "texts.txt"),
                 "--norm", "layernorm_simple", "--max_steps", "4", "--output_dir", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / RESULT_FILE).read_text())["steps"] == 4


def test_the_defaults_that_depend_on_the_norm_are_the_ones_measured_for_it(workspace, tmp_path, monkeypatch):
    from hf_adanorm.convert import rescale
    from hf_adanorm.convert.args import DEFAULTS, DEFAULTS_BY_NORM, parse_args
    from hf_adanorm.convert.report import ARGS_FILE
    ada = DEFAULTS_BY_NORM["adanorm"]
    assert all(ada[name] != DEFAULTS[name] for name in ada)
    common = ["--model", "m", "--dataset", "d"]
    for name in DEFAULTS:
        assert getattr(parse_args([*common, "--norm", "adanorm"]), name) == ada[name]
        assert getattr(parse_args([*common, "--norm", "layernorm_simple"]), name) == DEFAULTS[name]
        given = 3 if isinstance(DEFAULTS[name], int) else 0.003
        assert getattr(parse_args([*common, "--norm", "adanorm", f"--{name}", str(given)]), name) == given
    with pytest.raises(ValueError, match="learning_rate"):
        ConvertArgs(model="m", dataset="d", learning_rate=float("nan"))
    # the conversion runs with them: AdamW's learning rate and the weight of the per-norm targets
    seen, weights = [], []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: (seen.append(lr), adamw(params, lr=lr, **kw))[1])
    loss = rescale.NormTargets.loss
    monkeypatch.setattr(rescale.NormTargets, "loss", lambda self, mask: (weights.append(1), loss(self, mask))[1])
    out = tmp_path / "out"
    convert_model(_args(workspace, out, max_steps=2, norm="adanorm"))
    assert seen == [ada["learning_rate"]] and weights
    saved = json.loads((out / ARGS_FILE).read_text())
    assert (saved["learning_rate"], saved["layer_loss_weight"]) == (ada["learning_rate"], ada["layer_loss_weight"])


def test_the_student_starts_as_the_teacher_with_dropout_off(workspace, tmp_path):
    # BERT's dropout (0.1 here) is on in train mode: a student distilled in train mode would start
    # with a loss of its dropout noise alone. At alpha = 0 the blended student is the teacher exactly
    # (without the rescaled start, which swaps the post-LN norms at step 0).
    result = convert_model(_args(workspace, tmp_path / "out", max_steps=1, eval_every=1, ramp_fraction=1.0,
                                 rescale_post_ln=False))
    assert result["history"][0]["mean_alpha"] == 0.0
    assert result["history"][0]["loss"] < 1e-6


@pytest.mark.slow
def test_a_folder_held_by_another_conversion_is_refused_and_nothing_is_written(workspace, tmp_path, monkeypatch):
    from test_recipe_guards import hold_lock

    from hf_adanorm.convert import loop
    from hf_adanorm.training.locks import FolderInUseError
    out = tmp_path / "out"
    holder, trainer = hold_lock(out, "conversion"), hold_lock(tmp_path / "run")
    try:
        before = _snapshot(out)
        with pytest.raises(FolderInUseError, match=rf"in use by another conversion: pid {holder.pid}"):
            convert_model(_args(workspace, out, max_steps=4))  # the early check, before the teacher loads
        assert _snapshot(out) == before
        with pytest.raises(FolderInUseError, match=rf"in use by another training run: pid {trainer.pid}"):
            convert_model(_args(workspace, tmp_path / "run", max_steps=4))  # the holder's kind, not ours
        with monkeypatch.context() as patch:  # the holder came after that check: the lock itself refuses
            patch.setattr(loop, "check_not_in_use", lambda *args: None)
            with pytest.raises(FolderInUseError, match=rf"in use by another conversion: pid {holder.pid}"):
                convert_model(_args(workspace, out, max_steps=4))
        assert _snapshot(out) == before
    finally:
        for process in (holder, trainer):
            process.send_signal(signal.SIGKILL)
            process.wait()
    result = convert_model(_args(workspace, out, max_steps=4))  # the dead holder's lock is free again
    assert result["steps"] == 4 and (out / RESULT_FILE).is_file()
    again = convert_model(_args(workspace, out, max_steps=4, overwrite_output_dir=True))  # keeps its own lock file
    assert again["steps"] == 4


@pytest.mark.slow
def test_a_running_conversion_is_named_as_the_holder_not_called_interrupted(workspace, tmp_path, monkeypatch):
    # A running conversion's folder holds checkpoints, as an interrupted one's does: another conversion
    # there must be told the folder is in use, not to resume it or to change its options.
    from test_recipe_guards import hold_lock

    from hf_adanorm.training.locks import FolderInUseError
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            convert_model(_args(workspace, out, max_steps=12, checkpointing_steps=5))
    holder = hold_lock(out, "conversion")
    try:
        before = _snapshot(out)
        for options in ({"max_steps": 6}, {"resume_from_checkpoint": None}):
            with pytest.raises(FolderInUseError, match=rf"in use by another conversion: pid {holder.pid}"):
                convert_model(_args(workspace, out, **{"max_steps": 12, "checkpointing_steps": 5, **options}))
        assert _snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _interrupt_after_first_checkpoint(monkeypatch):
    from hf_adanorm.training import checkpoints
    original = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_stop)


def test_a_resume_keeps_the_rescaled_start_its_checkpoint_was_made_with(workspace, tmp_path, monkeypatch):
    from hf_adanorm.convert import loop
    from hf_adanorm.training.checkpoints import STATE_FILE
    reference = convert_model(_args(workspace, tmp_path / "reference", max_steps=12, checkpointing_steps=5))
    assert reference["rescaled"], "the tiny BERT should start rescaled, or this test tests nothing"

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            convert_model(_args(workspace, out, max_steps=12, checkpointing_steps=5))
    state_file = out / "checkpoints" / "step_5" / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["rescaled"] == list(reference["rescaled"])

    # a recorded norm this teacher gives no start for: refused before anything is written
    state_file.write_text(json.dumps({**state, "rescaled": state["rescaled"] + ["encoder.layer.9.output.LayerNorm"]}))
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match="encoder.layer.9.output.LayerNorm"):
        convert_model(_args(workspace, out, max_steps=12, checkpointing_steps=5))
    assert _snapshot(out) == before
    state_file.write_text(json.dumps(state))

    # A choice made anew would now be "no rescaling"; the resume must keep the checkpoint's.
    monkeypatch.setattr(loop, "_closer", lambda a, b: False)
    resumed = convert_model(_args(workspace, out, max_steps=12, checkpointing_steps=5))
    assert resumed["resumed_from"] == str(out / "checkpoints" / "step_5")
    assert resumed["rescaled"] == reference["rescaled"] and resumed["start"] == reference["start"]
    assert resumed["history"] == reference["history"]
    got, want = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "reference" / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


TOKENIZER_LOAD = textwrap.dedent("""
    import json, sys
    import hf_adanorm
    tokenizer = hf_adanorm.load_tokenizer(sys.argv[1], **json.loads(sys.argv[2]))
    print(json.dumps(tokenizer("the dull film")["input_ids"]))
""")


@pytest.mark.slow
def test_a_converted_models_tokenizer_loads_without_the_remote_code_prompt(workspace, tmp_path):
    # config.json names the model's remote code; AutoTokenizer alone would print transformers'
    # "Do you wish to run the custom code? [y/N]" and wait 15 s wherever stdin is open (a terminal).
    from transformers import AutoTokenizer
    convert_model(_args(workspace, tmp_path / "out", max_steps=2))
    original = AutoTokenizer.from_pretrained(workspace / "bert")("the dull film")["input_ids"]
    for kwargs in ({}, {"config": None}):  # config=None, as a wrapper passes it on, is no config
        done = subprocess.run([sys.executable, "-c", TOKENIZER_LOAD, str(tmp_path / "out" / "model"), json.dumps(kwargs)],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "custom code" not in done.stdout + done.stderr, kwargs
        assert json.loads(done.stdout.strip().splitlines()[-1]) == original
    # the model card's loading code runs as written, and gives this tokenizer
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    scope = {"path": str(tmp_path / "out" / "model")}
    exec(card.split("```python\n", 1)[1].split("```", 1)[0], scope)
    assert scope["tokenizer"]("the dull film")["input_ids"] == original

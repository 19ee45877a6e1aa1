"""A converted model downstream: the recipes fine-tune it (and refuse what would be wrong),
``compare --convert`` converts once per norm and reuses it, and ``GradualSwapCallback``
swaps the norms in during ``Trainer`` fine-tuning."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)

import hf_adanorm
from hf_adanorm.convert import ConvertArgs, convert_model
from hf_adanorm.convert.schedule import BlendedNorm, alphas
from hf_adanorm.training import TrainingArgs, run_training

from test_callbacks_lifecycle import StopAt
from test_convert import workspace  # noqa: F401 - the tiny 'pretrained' models and their text
from test_recipes import write_sentiment_csvs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(workspace, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("converted")
    convert_model(ConvertArgs(model=str(workspace / "bert"), dataset=str(workspace / "texts.txt"), norm="adanorm",
                              C=2.0, max_steps=10, max_length=32, output_dir=str(out)))
    return out / "model"


def _run(tmp_path, model, norm, **extra):
    return run_training(TrainingArgs(task="classification", model=str(model), dataset=str(
        write_sentiment_csvs(tmp_path / "data")), norm=norm, num_epochs=1, per_device_batch_size=8,
        max_length=16, output_dir=str(tmp_path / f"run-{norm}"), save_model=False, **extra))


def test_the_recipes_fine_tune_a_converted_model_with_its_own_norms(converted, tmp_path):
    metrics = _run(tmp_path, converted, "adanorm", C=2.0)
    assert metrics["config"]["model"] == str(converted)
    run_config = json.loads((tmp_path / "run-adanorm" / "run_config.json").read_text())
    assert run_config["patch_report"] is None and run_config["fold"] is None  # nothing swapped again
    # the loaded classifier holds the converted encoder: its norms are AdaNorms with C = 2
    model = hf_adanorm.from_pretrained(BertForSequenceClassification, converted, num_labels=2)
    norms = [m for m in model.modules() if isinstance(m, hf_adanorm.AdaNorm)]
    assert len(norms) == 5 and all(n.C == 2.0 for n in norms)
    assert all(name.startswith("bert.") for name in hf_adanorm.get_patch_record(model)["modules"])


@pytest.mark.parametrize("norm, options, match", [
    ("layernorm", {}, "no LayerNorms left"),
    ("layernorm_simple", {}, "norm='layernorm_simple'"),
    ("adanorm", {"C": 1.0}, "C=1.0"),
])
def test_the_recipes_refuse_a_converted_model_with_other_norms(converted, tmp_path, norm, options, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, converted, norm, **options)
    assert not (tmp_path / f"run-{norm}").exists()


@pytest.mark.slow
def test_compare_convert_converts_once_per_norm_and_reports_the_start(workspace, tmp_path, monkeypatch):  # noqa: F811
    from hf_adanorm.compare import compare
    setup = {"model": str(workspace / "bert"), "dataset": str(write_sentiment_csvs(tmp_path / "data")),
             "num_epochs": 1, "per_device_batch_size": 8, "max_length": 16, "save_model": False}
    conversion = {"max_steps": 6, "eval_every": 3}
    out = tmp_path / "sweep"
    report = compare(setup, ["layernorm", "adanorm"], [0, 1], out, progress=False, conversion=conversion)
    (folder,) = (out / "conversions").iterdir()
    assert folder.name.startswith("adanorm-")
    result = folder / "conversion.json"
    stamp = result.stat().st_mtime_ns
    for seed in (0, 1):
        config = json.loads((out / "runs" / f"adanorm_seed{seed}" / "metrics.json").read_text())["config"]
        assert config["model"] == str(folder / "model")
        baseline = json.loads((out / "runs" / f"layernorm_seed{seed}" / "metrics.json").read_text())["config"]
        assert baseline["model"] == setup["model"]
    text = report.read_text()
    start = json.loads(result.read_text())
    assert "## Starting point of each arm" in text and f"{start['converted']['embedding_cosine']:.4g}" in text
    # rerun: nothing converts or trains again; other conversion options are refused for this folder
    compare(setup, ["layernorm", "adanorm"], [0, 1], out, progress=False, conversion=conversion)
    assert result.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="convert"):
        compare(setup, ["layernorm", "adanorm"], [0, 1], out, progress=False, conversion={"max_steps": 7})
    # the same options under other defaults (a new version) plan another conversion: its runs would join
    # the report beside those of the old one, so the sweep is refused before anything runs
    from hf_adanorm.convert import args as convert_args
    monkeypatch.setitem(convert_args.DEFAULTS_BY_NORM["adanorm"], "layer_loss_weight", 3.0)
    with pytest.raises(ValueError, match=r"adanorm_seed0 fine-tuned the conversion .*differ.*overwrite_output_dir"):
        compare(setup, ["layernorm", "adanorm"], [0, 1, 2], out, progress=False, conversion=conversion)
    assert sorted(p.name for p in (out / "conversions").iterdir()) == [folder.name]
    assert not (out / "runs" / "adanorm_seed2").exists()


def test_compare_convert_refuses_a_model_built_from_a_config(tmp_path):
    from hf_adanorm.compare import compare
    from hf_adanorm.compare.conversions import plan_conversions
    with pytest.raises(ValueError, match="pretrained --model"):
        plan_conversions({"model": "config:bert", "dataset": "x"}, ["layernorm", "adanorm"], tmp_path, {})
    with pytest.raises(ValueError, match="convert-options"):
        plan_conversions({"model": "m", "dataset": "x"}, ["adanorm"], tmp_path, {"no_such_option": 1})
    # the teacher and the norm options come from the sweep: a conversion with another k would be refused
    # by the fine-tuning only after it had run, and another model would make an unfair baseline
    for option, value in (("k", 0.2), ("C", 2.0), ("eps_mode", "fairseq"), ("model", "other"), ("tokenizer", "t")):
        with pytest.raises(ValueError, match=rf"cannot set \['{option}'\]: the conversion takes them from the sweep"):
            plan_conversions({"model": "m", "dataset": "x"}, ["adanorm"], tmp_path, {option: value})
    # the norm and the folder are each arm's own (from Python too, where the norm was once overridden silently)
    for option, value in (("norm", "layernorm_simple"), ("output_dir", str(tmp_path / "x"))):
        with pytest.raises(ValueError, match=rf"cannot set \['{option}'\]: the sweep sets them per norm"):
            plan_conversions({"model": "m", "dataset": "x"}, ["adanorm"], tmp_path, {option: value})
    assert not any(tmp_path.iterdir())
    # through compare() too: refused before its lock would create the sweep folder
    with pytest.raises(ValueError, match=r"cannot set \['k'\]"):
        compare({"model": "m", "dataset": "x"}, ["layernorm", "adanorm"], [0], tmp_path / "sweep", progress=False,
                conversion={"k": 0.2})
    assert not any(tmp_path.iterdir())
    # with no --max_length the runs fine-tune at TrainingArgs' default, and the conversion distils at it too
    (plan,) = plan_conversions({"model": "m", "dataset": "x"}, ["layernorm", "adanorm"], tmp_path, {}).values()
    assert plan.max_length == TrainingArgs(model="m", dataset="x").max_length == 128
    (plan,) = plan_conversions({"model": "m", "dataset": "x", "max_length": 48}, ["adanorm"], tmp_path, {}).values()
    assert plan.max_length == 48
    # and holds out the runs' validation split, so that it never distils on a sentence the runs evaluate on
    runs = TrainingArgs(model="m", dataset="x")
    (plan,) = plan_conversions({"model": "m", "dataset": "x"}, ["adanorm"], tmp_path, {}).values()
    assert (plan.validation_fraction, plan.split_seed) == (runs.validation_fraction, runs.split_seed) == (0.1, 0)
    (plan,) = plan_conversions({"model": "m", "dataset": "x", "validation_fraction": 0.2, "split_seed": 3},
                               ["adanorm"], tmp_path, {}).values()
    assert (plan.validation_fraction, plan.split_seed) == (0.2, 3)
    # a --model_config that changes the function after the conversion would make its drift describe another model
    with pytest.raises(ValueError, match=r"--model_config \['hidden_act'\].*dropout settings are allowed"):
        plan_conversions({"model": "m", "dataset": "x", "model_config": {"hidden_act": "relu",
                                                                         "hidden_dropout_prob": 0.2}},
                         ["adanorm"], tmp_path, {})
    for dropout in ({"hidden_dropout_prob": 0.2}, {"resid_pdrop": 0.0, "embd_pdrop": 0.0}, {"layerdrop": 0.1}):
        plan_conversions({"model": "m", "dataset": "x", "model_config": dropout}, ["adanorm"], tmp_path, {})
    assert not any(tmp_path.iterdir())


class _Alphas(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append([b.alpha for b in model.modules() if isinstance(b, BlendedNorm)])


def test_gradual_swap_callback_blends_the_norms_in_then_leaves_only_the_new_ones(tmp_path, token_dataset):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    spy = _Alphas()
    swap = hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=4, schedule="layerwise")
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=6, report_to=[],
                             save_strategy="no", use_cpu=True)
    Trainer(model, args, train_dataset=token_dataset, callbacks=[swap, spy]).train()
    assert spy.seen[:4] == [alphas("layerwise", step, 4, 5) for step in range(4)]
    assert spy.seen[4:] == [[], []]  # unwrapped once every alpha reached 1
    assert not any(isinstance(m, (BlendedNorm, torch.nn.LayerNorm)) for m in model.modules())
    assert len(hf_adanorm.get_patch_record(model)["modules"]) == len(originals)


def test_gradual_swap_callback_refuses_bad_options_and_a_patched_model(tmp_path, token_dataset):
    with pytest.raises(ValueError, match="ramp_steps"):
        hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=3, schedule="swap")
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    hf_adanorm.patch_model(model, "adanorm")
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(RuntimeError, match="unpatched"):
        Trainer(model, args, train_dataset=token_dataset, callbacks=[hf_adanorm.GradualSwapCallback(
            "adanorm", ramp_steps=2)])


@pytest.mark.slow
def test_conversion_under_accelerate_launch_on_two_gloo_processes(workspace, tmp_path):  # noqa: F811
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo / "recipes" / "configs" / "cpu_2proc.yaml"), "-m", "hf_adanorm", "convert", "--cpu",
           "--model", str(workspace / "bert"), "--dataset", str(workspace / "texts.txt"), "--norm", "adanorm",
           "--max_steps", "6", "--eval_every", "3", "--max_length", "32", "--output_dir", str(out)]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "conversion.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 6
    assert "pooler.dense.weight" in result["frozen_unreached"]  # DDP needs a gradient for every trained one
    assert result["converted"]["embedding_cosine"] > result["naive"]["embedding_cosine"]


def _constant_gain_bert(seed=0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(float(torch.rand(()) + 0.5))
                module.bias.copy_(torch.randn(module.bias.shape) * 0.3)
    return model


def _probe(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (3, 9), generator=gen), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


@pytest.mark.parametrize("norm, options", [("layernorm_simple", {}), ("adanorm", {"C": 2.0, "k": 1e-7})])
def test_gradual_swap_with_a_rescale_probe_starts_as_the_original_where_gains_are_constant(
        tmp_path, token_dataset, norm, options):
    # Every post-LN norm but the last starts rescaled (swapped at step 0, exact where γ is a constant),
    # the last one blends in from α = 0: so the model starts as the original, which the naive swap does not.
    model = _constant_gain_bert()
    original = copy.deepcopy(model)
    swap = hf_adanorm.GradualSwapCallback(norm, ramp_steps=4, rescale_probe=_probe(), eps_mode="torch", **options)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=6, report_to=[],
                             save_strategy="no", use_cpu=True)
    trainer = Trainer(model, args, train_dataset=token_dataset, callbacks=[swap])
    norms = [n for n, m in original.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert swap.rescaled == sorted(norms[:-1]) and list(swap.wrapped) == norms[-1:]
    batch = _probe(seed=2)
    with torch.no_grad():
        want = original.bert(**batch).last_hidden_state
        torch.testing.assert_close(model.eval().bert(**batch).last_hidden_state, want, atol=1e-5, rtol=1e-5)
        naive = copy.deepcopy(original)
        hf_adanorm.patch_model(naive, norm, eps_mode="torch", **options)
        assert (naive.bert(**batch).last_hidden_state - want).norm() > 0.1 * want.norm()  # what the rescale is for
    with pytest.raises(ValueError, match="rescaled"):  # the norms alone would not give the original back
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model)
    trainer.train()  # then the ramp runs as without it, and only the new norms remain
    assert not any(isinstance(m, (BlendedNorm, torch.nn.LayerNorm)) for m in model.modules())


def test_gradual_swap_rescale_probe_refusals_leave_the_model_as_it_was(tmp_path, token_dataset):
    with pytest.raises(TypeError, match="rescale_probe"):
        hf_adanorm.GradualSwapCallback("layernorm_simple", ramp_steps=2, rescale_probe=[[1, 2, 3]])
    with pytest.raises(ValueError, match="no_norm"):
        hf_adanorm.GradualSwapCallback("no_norm", ramp_steps=2, rescale_probe=_probe())
    with pytest.raises(ValueError, match="fold_affine"):
        hf_adanorm.GradualSwapCallback("layernorm_simple", ramp_steps=2, rescale_probe=_probe(), fold_affine=True)
    model = _constant_gain_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="optimizer"):  # the patch's own check, after the sites were found
        Trainer(model, args, train_dataset=token_dataset, optimizers=(optimizer, None),
                callbacks=[hf_adanorm.GradualSwapCallback("layernorm_simple", ramp_steps=2, rescale_probe=_probe())])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("probe", [None, _probe()], ids=["blend", "rescaled"])
def test_gradual_swap_resumes_inside_the_ramp_exactly(tmp_path, token_dataset, probe):
    # A checkpoint inside the ramp holds the blended norms' frozen originals; a fresh model given the
    # same callback (and the same probe) gets the same structure, and the checkpoint its weights.
    def run(folder, seed, callbacks, resume=None, probe=probe):
        model = _constant_gain_bert(seed)
        args = TrainingArguments(str(folder), per_device_train_batch_size=4, max_steps=6, save_strategy="steps",
                                 save_steps=2, report_to=[], use_cpu=True, seed=0)
        swap = hf_adanorm.GradualSwapCallback("layernorm_simple", ramp_steps=4, rescale_probe=probe)
        Trainer(model, args, train_dataset=token_dataset, callbacks=[swap, *callbacks]).train(
            resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight", 0, [])
    run(tmp_path / "resumed", 0, [StopAt(2)])
    checkpoint = str(tmp_path / "resumed" / "checkpoint-2")
    other = _probe() if probe is None else None  # a resume that forgets the probe, or adds one: refused
    with pytest.raises(RuntimeError, match="rescaled: .* then.*Resume with the same ramp_steps, schedule and rescale_probe"):
        run(tmp_path / "resumed", 1, [], resume=checkpoint, probe=other)
    resumed = run(tmp_path / "resumed", 1, [], resume=checkpoint)
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key

"""The recipes' arguments: command lines, shared option help, validation before any work,
the shipped accelerate configs, and the causal-LM block cutting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import REPO, tiny_args
from transformers import HfArgumentParser

from hf_adanorm.config import NormConfig
from hf_adanorm.training import TrainingArgs, parse_args, run_training
from hf_adanorm.training.args import NORM_OPTIONS


def test_norm_options_share_norm_configs_help_and_defaults():
    ours, theirs = ({f.name: f for f in dataclasses.fields(cls)} for cls in (TrainingArgs, NormConfig))
    for name in NORM_OPTIONS:
        assert ours[name].metadata["help"] == theirs[name].metadata["help"], name
        assert ours[name].default == theirs[name].default, name
    args = TrainingArgs(model="m", dataset="d.csv", norm="detachnorm", detach="mean", eps_mode="fairseq")
    assert (args.norm_config().detach, args.norm_config().eps_mode) == ("mean", "fairseq")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["classification", "causal_lm"])
def test_recipe_command_line(recipe, capsys):
    args = parse_args(recipe, ["--model", "m", "--dataset", "d.csv", "--k", "0.3"])
    assert (args.task, args.k) == (recipe, 0.3)
    with pytest.raises(SystemExit) as exit_:
        parse_args(recipe, ["--model", "m", "--dataset", "d.csv", "--norm", "adanrom"])
    assert exit_.value.code == 2 and "unknown norm 'adanrom'" in capsys.readouterr().err
    # the script itself: parse_args, then the package's training_function
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--model", "m",
                           "--dataset", "d.csv", "--tokenizer", "char", "--max_length", "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "max_length must be >= 1" in done.stderr, done.stderr[-2000:]



@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["classification", "causal_lm"])
def test_bad_data_is_one_line_from_the_script_not_a_traceback(recipe, tmp_path):
    """A non-UTF-8 file gave the clear message only after three chained tracebacks (27 frames)."""
    (tmp_path / "train.csv").write_bytes(b"text,label\ncaf\xe9 good,1\nbad,0\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--model", "config:bert",
                           "--tokenizer", "word", "--dataset", str(tmp_path / "train.csv"),
                           "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{recipe}.py: error: " in done.stderr and "is not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr


def test_blocks_are_cut_from_groups_of_a_thousand_examples():
    from datasets import Dataset

    from hf_adanorm.training.causal_lm import group_texts
    # example i holds tokens 3i, 3i+1, 3i+2: the stream is 0 .. 7499, 3000 tokens per group of
    # 1000 examples; blocks of 7 leave 3000 % 7 = 4 tokens over in each full group.
    tokenized = Dataset.from_dict({"input_ids": [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(2500)]})
    blocks = group_texts(tokenized, 7)
    expected = [list(range(start + 7 * j, start + 7 * j + 7))
                for start, n_blocks in ((0, 428), (3000, 428), (6000, 214)) for j in range(n_blocks)]
    assert blocks["input_ids"] == expected and blocks["labels"] == expected


@pytest.mark.parametrize("change, error, message", [
    ({"dataset": "missing/train.csv"}, FileNotFoundError, "does not exist"),
    ({"text_column": "sentence"}, ValueError, r"no column \['sentence'\].*columns are \['text', 'label'\]"),
    ({"label_column": "stars"}, ValueError, r"no column \['stars'\]"),
    ({"model": "no/such-model-folder"}, FileNotFoundError, "no such local folder, and the hub id .* is not in the "
                                                           "local cache"),
    ({"model": "config:not_an_architecture"}, ValueError, "cannot load model"),
])
def test_bad_input_fails_before_training(tmp_path, change, error, message):
    args = TrainingArgs(**tiny_args(tmp_path, **change))
    with pytest.raises(error, match=message):
        run_training(args)
    assert not Path(args.output_dir).exists(), "something was written before the error"


def test_bad_options_fail_when_parsed():
    with pytest.raises(ValueError, match="unknown norm 'adanrom'; choose 'layernorm'.*'adanorm'"):
        TrainingArgs(model="m", dataset="x.csv", norm="adanrom")
    with pytest.raises(ValueError, match="k > 0"):
        TrainingArgs(model="m", dataset="x.csv", norm="adanorm", k=0.0)
    with pytest.raises(ValueError, match="no tokenizer"):
        TrainingArgs(dataset="x.csv", model="config:gpt2")
    with pytest.raises(ValueError, match="no model"):
        TrainingArgs(dataset="x.csv")
    with pytest.raises(ValueError, match="no dataset"):
        TrainingArgs(model="m")


@pytest.mark.parametrize("option, value", [
    ("learning_rate", True), ("learning_rate", "5e-5"), ("weight_decay", True), ("max_grad_norm", True),
    ("max_grad_norm", "1.0"), ("warmup_steps", True), ("warmup_steps", 2.5),
    ("per_device_batch_size", 1.5), ("gradient_accumulation_steps", 2.5), ("num_epochs", 2.5),
    ("max_steps", True), ("max_length", "128"),
])
def test_a_bool_or_a_string_is_not_taken_as_a_number(option, value):
    # True is an int to Python and would train with 1; a string would fail deep inside torch
    with pytest.raises(ValueError, match=option):
        TrainingArgs(model="m", dataset="x.csv", **{option: value})


@pytest.mark.parametrize("name, distributed_type, extra", [
    ("single_gpu", "NO", {}), ("multi_gpu", "MULTI_GPU", {}),
    ("fsdp", "FSDP", {"fsdp_version": 2, "fsdp_reshard_after_forward": True}),
    ("deepspeed_zero2", "DEEPSPEED", {"zero_stage": 2}), ("deepspeed_zero3", "DEEPSPEED", {"zero_stage": 3}),
    ("cpu_2proc", "MULTI_GPU", {}),  # the launcher that really spawns N ranks (see the file)
])
def test_accelerate_configs_load(name, distributed_type, extra):
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(REPO / "recipes" / "configs" / f"{name}.yaml"))
    assert str(config.distributed_type) == f"DistributedType.{distributed_type}"
    assert config.num_processes == (1 if name == "single_gpu" else 2)
    settings = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert all(settings.get(key) == value for key, value in extra.items()), settings


def test_command_line_parses_into_training_args():
    parser = HfArgumentParser(TrainingArgs)
    (args,) = parser.parse_args_into_dataclasses(
        ["--model", "m", "--dataset", "d.csv", "--norm", "layernorm_simple", "--max_steps", "7", "--cpu",
         "--model_config", '{"num_hidden_layers": 2}', "--tokenizer", "char"])
    assert (args.norm, args.max_steps, args.cpu, args.model_config) == ("layernorm_simple", 7, True,
                                                                         {"num_hidden_layers": 2})
    assert args.norm_config().norm == "layernorm_simple"
    assert TrainingArgs(model="m", dataset="d.csv").norm_config() is None  # the baseline is not patched

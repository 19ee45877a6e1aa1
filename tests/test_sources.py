"""A --model or --tokenizer that names nothing loadable is named as such, before anything is written, by
convert, the recipes and compare; '~' in a path is the home folder everywhere."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from hf_adanorm.cli import main
from hf_adanorm.convert import ConvertArgs, convert_model
from hf_adanorm.sources import check_model_source
from hf_adanorm.training import TrainingArgs, run_training

from test_convert import _args, workspace  # noqa: F401
from test_recipes import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

MISSING_PATH = "no such file or folder"
NOT_CACHED = "is not in the local cache"


@pytest.mark.parametrize("value", ["./missing", "../missing/model", "/abs/missing", "a/b/c"])
def test_a_path_that_does_not_exist_is_named_as_one(value):
    with pytest.raises(FileNotFoundError, match=f"--model {value}: {MISSING_PATH}"):
        check_model_source("model", value)


def test_a_hub_id_is_refused_offline_only_when_it_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=f"'nobody/no-model' {NOT_CACHED} .HF_HUB_OFFLINE"):
        check_model_source("tokenizer", "nobody/no-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_model_source("tokenizer", "nobody/no-model")  # online: left to the download, which says why
    check_model_source("model", str(tmp_path))  # an existing folder


@pytest.mark.parametrize("option", ["model", "tokenizer"])
def test_convert_names_a_missing_model_or_tokenizer_and_writes_nothing(workspace, tmp_path, option):  # noqa: F811
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=f"--{option} .*missing: {MISSING_PATH}"):
        convert_model(_args(workspace, out, **{option: str(tmp_path / "missing")}))
    assert not out.exists()


def test_convert_command_reports_it_as_an_error(tmp_path, capsys):
    code = main(["convert", "--model", str(tmp_path / "missing"), "--norm", "adanorm", "--dataset",
                 str(tmp_path / "t.txt"), "--output_dir", str(tmp_path / "out")])
    assert code == 2 and MISSING_PATH in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["model", "tokenizer"])
def test_a_recipe_names_a_missing_model_or_tokenizer_and_writes_nothing(tmp_path, option):
    overrides = {"model": str(tmp_path / "missing"), "tokenizer": None} if option == "model" else {
        "tokenizer": str(tmp_path / "missing")}
    args = TrainingArgs(**tiny_args(tmp_path, **overrides))
    with pytest.raises(FileNotFoundError, match=f"--{option} .*missing: {MISSING_PATH}"):
        run_training(args)
    assert not (tmp_path / "run").exists()


def test_compare_names_a_missing_model_before_its_sweep_folder_exists(tmp_path, capsys):
    code = main(["compare", "--model", "./missing-model", "--dataset", str(tmp_path / "d.csv"), "--output-dir",
                 str(tmp_path / "sweep"), "--norms", "layernorm", "adanorm", "--seeds", "0", "1", "--no-progress"])
    assert code == 2 and f"--model ./missing-model: {MISSING_PATH}" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_home_path_is_expanded_where_the_shell_did_not(workspace, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HOME", str(workspace))
    args = _args(workspace, "~/out", model="bert", tokenizer="~/bert", dataset="~/texts.txt")
    assert (args.model, args.tokenizer, args.dataset) == (str(workspace / "bert"), str(workspace / "bert"),
                                                          str(workspace / "texts.txt"))
    assert args.output_dir == str(workspace / "out")
    assert ConvertArgs(model="~/bert", dataset="t", output_dir="o").model == str(workspace / "bert")
    training = TrainingArgs(model="~/bert", dataset="~/d.csv", output_dir="~/run", tokenizer="~/tok")
    assert (training.model, training.dataset, training.output_dir, training.tokenizer) == (
        str(workspace / "bert"), str(workspace / "d.csv"), str(workspace / "run"), str(workspace / "tok"))


def test_inspect_names_a_missing_model_too(capsys):
    assert main(["inspect", "--model", "/no/such/model"]) == 2
    assert f"--model /no/such/model: {MISSING_PATH}" in capsys.readouterr().err


def test_the_command_lines_help_says_what_each_no_flag_does(capsys):
    for command in (["compare", "--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        text = " ".join(capsys.readouterr().out.split())
        assert "95%%" not in text
        flag = "save_model" if command[0] == "compare" else "fold_affine"
        assert f"--no_{flag}, --no-{flag.replace('_', '-')} Turn --{flag} off" in text


@pytest.mark.parametrize("arch, flag", [("t5", "--include_rmsnorm"), ("vit", "--include-rmsnorm"), ("bart", None)])
def test_inspect_runs_every_kind_of_tiny_model(arch, flag, capsys):
    """`--arch t5` (decoder ids) and `--arch vit` (images) failed after the listing: the check fed input_ids
    only. The docs spell the flag include_rmsnorm, as convert and compare take it."""
    assert main(["inspect", "--arch", arch, *([flag] if flag else [])]) == 0
    out = capsys.readouterr().out
    assert "unpatch restores the output bitwise: True" in out
    if arch == "t5":
        assert "T5LayerNorm" in out and "RMSAdaNorm" in out


@pytest.mark.slow
def test_inspect_says_what_it_could_not_check(capsys):
    assert main(["inspect", "--arch", "clip"]) == 2
    err = capsys.readouterr().err
    assert "the list above stands, but CLIPModel cannot run a random batch of input_ids alone" in err
    assert main(["inspect", "--arch", "wav2vec2"]) == 2  # it said "fold_affine=True needs a probe batch"
    err = capsys.readouterr().err
    assert "no random batch is built for Wav2Vec2Model's main input 'input_values'" in err and "fold_affine" not in err
    assert main(["inspect", "--arch", "segformer"]) == 2  # a traceback from its config before
    assert "cannot build a tiny 'segformer'" in capsys.readouterr().err


def test_convert_help_shows_no_default_of_none(capsys):
    """ArgumentDefaultsHelpFormatter wrote "(default: None)" after help that names the real default."""
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: 600)" in text

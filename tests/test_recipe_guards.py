"""What would train wrong is refused: bad options, inexact resumes, a second process in a run
folder, bad data; and what trained subtly wrong is fixed: weight decay of norms, pair vocabulary."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recipes import REPO, TINY_BERT, tiny_args

from hf_adanorm.training import TrainingArgs, parse_args, run_training
from hf_adanorm.training.args import SCHEDULERS
from hf_adanorm.training.checkpoints import CHECKPOINT_DIR, METRICS_FILE
from hf_adanorm.training.locks import FolderInUseError, folder_lock

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("change, message", [
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be"),
    ({"learning_rate": math.nan}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": -1.0}, "learning_rate must be"),
    ({"learning_rate": 0.0}, "learning_rate must be"),
    ({"learning_rate": math.inf}, "learning_rate must be"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ({"warmup_steps": -5}, "warmup_steps must be an integer >= 0"),
    ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*32 - 1"),
    ({"seed": 2**40}, "seed must be"),
    ({"split_seed": -1}, "split_seed must be"),
    ({"lr_scheduler": "bogus"}, "unknown lr_scheduler 'bogus'; choose one of .*'linear'"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "unknown lr_scheduler"),  # needs a metric at each step
    ({"output_dir": ""}, "output_dir is empty"),
])
def test_bad_options_are_refused_when_parsed(change, message):
    with pytest.raises(ValueError, match=message):
        TrainingArgs(**{"model": "m", "dataset": "d.csv", **change})


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        TrainingArgs(model="m", dataset="d.csv", output_dir=str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_the_recipe_command_line_refuses_gradient_ascent(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args("classification", ["--model", "m", "--dataset", "d.csv", "--max_grad_norm", "-1"])
    assert exit_.value.code == 2 and "max_grad_norm must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["none", "None", "null"])
def test_clipping_can_be_turned_off_on_every_command_line(text, tmp_path, monkeypatch):
    from hf_adanorm.convert.args import parse_args as parse_convert_args
    assert parse_args("classification", ["--model", "m", "--dataset", "d.csv", "--max_grad_norm", text]).max_grad_norm is None
    assert parse_convert_args(["--model", "m", "--dataset", "d", "--max_grad_norm", text]).max_grad_norm is None
    seen = {}

    def fake_compare(setup, *args, **kwargs):
        seen.update(setup)
        (tmp_path / "report.md").write_text("")
        return tmp_path / "report.md"

    monkeypatch.setattr("hf_adanorm.compare.compare", fake_compare)
    from hf_adanorm.cli import main
    assert main(["compare", "--model", str(tmp_path), "--dataset", "d.csv", "--max_grad_norm", text,
                 "--output-dir", str(tmp_path / "o")]) == 0
    assert "max_grad_norm" in seen and seen["max_grad_norm"] is None
    assert parse_args("classification", ["--model", "m", "--dataset", "d.csv", "--max_grad_norm", "0.5"]).max_grad_norm == 0.5


def test_every_accepted_scheduler_builds_and_steps():
    from transformers import get_scheduler
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    for name in SCHEDULERS:
        scheduler = get_scheduler(name, optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        TrainingArgs(model="m", dataset="d.csv", lr_scheduler=name)


def test_resume_with_other_options_or_a_bad_random_state_is_refused(tmp_path):
    args = tiny_args(tmp_path, num_epochs=1, checkpointing_steps=2)  # 6 steps: step_2, step_4, step_6
    run_training(TrainingArgs(**args))
    run = Path(args["output_dir"])
    step_2 = run / CHECKPOINT_DIR / "step_2"
    before = snapshot(run)
    resume = dict(args, resume_from_checkpoint=str(step_2))
    changed = dict(resume, learning_rate=1.0, seed=4, norm="layernorm_simple")
    with pytest.raises(ValueError, match=r"cannot resume .*step_2 exactly: its run was trained with ") as refused:
        run_training(TrainingArgs(**changed))
    for difference in ("norm='adanorm' (now 'layernorm_simple')", "seed=3 (now 4)", "learning_rate=0.002 (now 1.0)"):
        assert difference in str(refused.value)
    with pytest.raises(ValueError, match=r"k=0.1 \(now 0.3\)"):
        run_training(TrainingArgs(**dict(resume, k=0.3)))
    assert snapshot(run) == before, "a refused resume wrote"

    states = step_2 / "random_states_0.pkl"
    states.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="random state random_states_0.pkl lacks a readable file"):
        run_training(TrainingArgs(**resume))
    states.unlink()
    with pytest.raises(ValueError, match="random_states_0.pkl lacks a readable file.*FileNotFoundError"):
        run_training(TrainingArgs(**resume))
    # options that change nothing the training sees may differ
    again = run_training(TrainingArgs(**dict(args, checkpoints_total_limit=5, save_model=False,
                                             resume_from_checkpoint=str(run / CHECKPOINT_DIR / "step_4"))))
    assert again["config"]["checkpoints_total_limit"] == 5 and again["config"]["learning_rate"] == 0.002


HOLD_LOCK = """
import sys, time
from hf_adanorm.training.locks import folder_lock
with folder_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(300)
"""


def hold_lock(folder: Path, what: str = "training run") -> subprocess.Popen:
    """Another process, a ``what``, that holds ``folder``'s lock until it is killed."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), what], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_a_run_folder_held_by_another_process_is_refused_and_recovered_after_kill_9(tmp_path):
    args = tiny_args(tmp_path, num_epochs=1, max_steps=1)
    holder = hold_lock(Path(args["output_dir"]))
    try:
        before = snapshot(args["output_dir"])
        with pytest.raises(FolderInUseError, match=rf"in use by another training run: pid {holder.pid} on host"):
            run_training(TrainingArgs(**args))
        assert snapshot(args["output_dir"]) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    metrics = run_training(TrainingArgs(**args))  # the dead process's lock is free again
    assert metrics["history"][-1]["step"] == 1
    with folder_lock(args["output_dir"], "test"):  # and the finished run released it
        pass


@pytest.mark.slow
def test_a_running_run_is_named_as_the_holder_not_as_another_runs_results(tmp_path):
    # A running run's folder holds checkpoints and metrics, as a finished or interrupted one's does:
    # another run there must be told the folder is in use, not to resume it or to overwrite it.
    args = tiny_args(tmp_path, num_epochs=1, max_steps=2, checkpointing_steps=1)
    run_training(TrainingArgs(**args))
    holder = hold_lock(Path(args["output_dir"]))
    try:
        before = snapshot(args["output_dir"])
        for options in ({}, {"resume_from_checkpoint": "latest", "learning_rate": 0.5}):
            with pytest.raises(FolderInUseError, match=rf"in use by another training run: pid {holder.pid}"):
                run_training(TrainingArgs(**{**args, **options}))
        assert snapshot(args["output_dir"]) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("target", ["loop", "another folder's lock"])
def test_a_lock_file_that_is_a_link_is_refused_clearly(tmp_path, target):
    from hf_adanorm.training.locks import check_not_in_use
    folder = tmp_path / "run"
    folder.mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text("")
    (folder / ".lock").symlink_to(folder / ".lock" if target == "loop" else tmp_path / "other" / ".lock")
    for check in (lambda: check_not_in_use(folder, "training run"), lambda: folder_lock(folder, "training run").__enter__()):
        with pytest.raises(FileExistsError, match=r"\.lock is a link \(to .*\), not a lock file: delete it and rerun"):
            check()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"] and (folder / ".lock").is_symlink()


@pytest.mark.slow
def test_folder_lock_is_exclusive_between_processes_and_nests_within_one(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            with folder_lock(tmp_path, "second"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path, "outer"):
        with folder_lock(tmp_path, "inner"):  # compare() holds the sweep folder around run_sweep()
            pass
        assert json.loads((tmp_path / ".lock.owner").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock.owner").exists()


def write_csv(folder: Path, name: str, content: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)


GOOD_ROWS = b"text,label\ngood film,1\nbad plot,0\nfine cast,1\npoor film,0\n"


@pytest.mark.parametrize("train, message", [
    (b"", r"train.csv \(train split\) is empty: expected a header line naming the columns"),
    (b"text,label\n", r"train.csv \(train split\) has a header \('text,label'\) but no rows"),
    (b"text,label\ngood film,1\n\xff\xfe bad,0\n", r"train.csv \(train split\), line 3, byte 1 .* is not UTF-8"),
    (b"text,label\ngood film,1\n,0\nok,1\n", r"train.csv: row 2 below the header has an empty 'text' cell \(1 of 3"),
    (b"text,label\ngood film,1\nbad,\nok,0\nfine,\n", r"train.csv: row 2 below the header has an empty 'label' cell "
                                                      r"\(2 of 4 rows do\)\. Every example needs a label"),
])
def test_bad_data_is_named_with_its_file_row_and_column(tmp_path, train, message):
    data = tmp_path / "mine"
    write_csv(data, "train.csv", train)
    write_csv(data, "validation.csv", GOOD_ROWS)
    args = TrainingArgs(**tiny_args(tmp_path, dataset=str(data)))
    with pytest.raises(ValueError, match=message):
        run_training(args)
    assert not Path(args.output_dir).exists(), "something was written before the error"


@pytest.mark.parametrize("hidden", [b"", b"-1"])  # empty cells, or GLUE's -1
def test_an_unlabelled_test_split_is_dropped_not_refused(tmp_path, hidden):
    from hf_adanorm.training import classification
    data = tmp_path / "mine"
    write_csv(data, "train.csv", GOOD_ROWS)
    write_csv(data, "validation.csv", GOOD_ROWS)
    write_csv(data, "test.csv", b"text,label\nnice film,%s\nawful plot,%s\n" % (hidden, hidden))
    task = classification.build_task(TrainingArgs(**tiny_args(tmp_path, dataset=str(data))))
    assert sorted(task.splits) == ["train", "validation"]


def test_a_test_split_with_one_unknown_label_is_refused_not_dropped(tmp_path):
    data = tmp_path / "mine"
    write_csv(data, "train.csv", GOOD_ROWS)
    write_csv(data, "validation.csv", GOOD_ROWS)
    write_csv(data, "test.csv", b"text,label\nnice film,1\nawful plot,0\nfine,2\n")  # a typo: 2
    args = TrainingArgs(**tiny_args(tmp_path, dataset=str(data)))
    with pytest.raises(ValueError, match=r"test labels \[2\] never occur in train"):
        run_training(args)
    assert not Path(args.output_dir).exists()


def test_macro_f1_averages_over_the_same_classes_in_every_run():
    from hf_adanorm.training.classification import compute_metrics
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])  # a 3-class task whose split holds no class 2
    one_error_as_0 = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    one_error_as_2 = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 0])  # the same error, called a class absent here
    f1 = [compute_metrics({"label": y, "prediction": p, "loss": np.ones(10)}, 0)["f1"]
          for p in (one_error_as_0, one_error_as_2)]
    from sklearn.metrics import precision_recall_fscore_support
    for p, value in zip((one_error_as_0, one_error_as_2), f1):  # by hand: the mean F1 of classes 0 and 1
        per_class = precision_recall_fscore_support(y, p, labels=[0, 1], zero_division=0)[2]
        assert value == pytest.approx(per_class.mean())  # the stray 2 is a missed 1, not a third class at F1 0


def test_a_built_vocabulary_covers_the_pair_column(tmp_path):
    from hf_adanorm.training import classification
    data = tmp_path / "mine"
    rows = b"premise,hypothesis,label\nthe cat sat,felines rest quietly,1\na dog ran,canines sprint fast,0\n" * 4
    write_csv(data, "train.csv", rows)
    write_csv(data, "validation.csv", rows)
    args = TrainingArgs(**tiny_args(tmp_path, dataset=str(data), text_column="premise",
                                    text_pair_column="hypothesis"))
    task = classification.build_task(args)
    unk = task.tokenizer.unk_token_id
    for words in ("felines rest quietly", "canines sprint fast", "the cat sat"):
        ids = task.tokenizer(words, add_special_tokens=False)["input_ids"]
        assert len(ids) == 3 and unk not in ids, words
    assert all(unk not in example["input_ids"] for example in task.splits["train"])


@pytest.mark.parametrize("level", ["word", "char"])
def test_a_built_tokenizer_marks_where_the_first_text_of_a_pair_ends(level):
    from hf_adanorm.training.modeling import build_vocab_tokenizer
    tokenizer = build_vocab_tokenizer(["a b c d e"], level)
    first, second = (tokenizer(*pair)["input_ids"] for pair in (("a b", "c d e"), ("a b c", "d e")))
    assert first != second
    assert tokenizer.convert_ids_to_tokens(first) == [*tokenizer.tokenize("a b"), "[EOS]", *tokenizer.tokenize("c d e")]
    assert tokenizer("a b c")["input_ids"] == tokenizer("a b c", add_special_tokens=False)["input_ids"]  # single: as before
    assert len(tokenizer("a b c", "d e", truncation=True, max_length=4)["input_ids"]) == 4


def test_classification_metrics_report_the_majority_baseline_and_the_classes_predicted():
    import numpy as np

    from hf_adanorm.training.classification import compute_metrics
    y = np.array([0, 0, 0, 1, 2, 0, 0, 1])  # class 0 is 5 of 8
    always_zero = compute_metrics({"label": y, "prediction": np.zeros(8), "loss": np.ones(8)}, majority_class=0)
    assert always_zero["predicted_classes"] == 1
    assert always_zero["majority_accuracy"] == always_zero["accuracy"] == 5 / 8
    mixed = compute_metrics({"label": y, "prediction": y[::-1].copy(), "loss": np.ones(8)}, majority_class=1)
    assert mixed["predicted_classes"] == 3 and mixed["majority_accuracy"] == 2 / 8


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=50, **TINY_BERT))


def test_weight_decay_is_grouped_as_transformers_trainer_groups_it():
    from transformers import Trainer

    from hf_adanorm.training.optimizer import decay_parameter_names
    model = tiny_bert()
    decayed = decay_parameter_names(model)
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))  # transformers' own rule
    assert not any("LayerNorm" in name or name.endswith("bias") for name in decayed)
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed

    class ScaleNorm(torch.nn.Module):  # a norm whose parameter's name says nothing of a norm
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ScaleNorm())
    assert decay_parameter_names(model) == {"0.weight"}


def test_one_adamw_step_decays_weights_only(tmp_path):
    """With zero gradients AdamW's step is the decay alone: p <- p (1 - lr wd) where decayed."""
    from hf_adanorm import NormConfig, patch_model
    from hf_adanorm.training.optimizer import make_optimizer
    for patched in (False, True):
        model = tiny_bert()
        if patched:
            patch_model(model, NormConfig(norm="adanorm", fold_affine=True))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = make_optimizer(model, learning_rate=0.1, weight_decay=0.5)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for name, p in model.named_parameters():
            is_norm_or_bias = "LayerNorm" in name or name.endswith("bias")
            expected = before[name] * (1.0 if is_norm_or_bias else 1 - 0.1 * 0.5)
            torch.testing.assert_close(p.detach(), expected, msg=name)
        assert any("LayerNorm" in name for name in before) != patched  # the patch removed the norms' parameters


METRIC_SCRIPT = '''
import datasets
import evaluate


class {name}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="test metric", citation="", inputs_description="",
                                   features=datasets.Features({{"predictions": datasets.Value("int64"),
                                                               "references": datasets.Value("int64")}}))

    def _compute(self, predictions, references):
        hits = sum(p == r for p, r in zip(predictions, references))
        return {{"{key}": hits / len(references), "per_class": [1.0, 2.0], "hits": hits}}
'''


def write_metric(folder: Path, name: str, key: str) -> Path:
    """A local evaluate metric script (evaluate loads it offline)."""
    (folder / name).mkdir(parents=True)
    path = folder / name / f"{name}.py"
    path.write_text(METRIC_SCRIPT.format(name=name.title().replace("_", ""), key=key))
    return path


def test_evaluate_metrics_by_local_path_beside_the_built_in_ones(tmp_path):
    agreement = write_metric(tmp_path / "metrics", "agreement", key="agreement")
    clash = write_metric(tmp_path / "metrics", "clash", key="accuracy")  # a key the built-in metrics use
    args = tiny_args(tmp_path, num_epochs=1, eval_metrics=[str(agreement), str(clash.parent)])
    metrics = run_training(TrainingArgs(**args))
    final = metrics["final"]
    # the evaluate metric counts what sklearn's accuracy_score counts, on the same predictions
    assert final["eval_agreement"] == final["eval_clash_accuracy"] == final["eval_accuracy"]
    assert final["eval_hits"] == round(final["eval_accuracy"] * 16)  # 16 validation rows
    assert "eval_per_class" not in final and metrics["config"]["eval_metrics"] == [str(agreement), str(clash.parent)]


def test_an_evaluate_metric_that_cannot_load_fails_before_anything_is_written(tmp_path):
    args = TrainingArgs(**tiny_args(tmp_path, eval_metrics=["no_such_metric_anywhere"]))
    with pytest.raises(ValueError, match="cannot load the evaluate metric 'no_such_metric_anywhere'.*local metric"):
        run_training(args)
    assert not Path(args.output_dir).exists()
    with pytest.raises(ValueError, match="classification only"):
        TrainingArgs(task="causal_lm", model="m", dataset="d.txt", eval_metrics=["x"])
    argv = ["--model", "m", "--dataset", "d.csv"]
    assert parse_args("classification", [*argv, "--eval_metrics", "a", "b/c.py"]).eval_metrics == ["a", "b/c.py"]
    assert parse_args("classification", argv).eval_metrics == []


def test_an_option_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    from hf_adanorm.training.checkpoints import STATE_FILE, check_resume
    args = TrainingArgs(**tiny_args(tmp_path))
    checkpoint = tmp_path / "checkpoints" / "step_1"
    checkpoint.mkdir(parents=True)
    recorded = {k: v for k, v in json.loads(json.dumps(args.to_dict())).items() if k != "eval_metrics"}
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "run": {"args": recorded, "world_size": 1}}))
    with pytest.raises(ValueError, match="random_states_0.pkl"):  # the options agree: on to the random states
        check_resume(checkpoint, args, 1)
    with pytest.raises(ValueError, match=r"eval_metrics=\[\] \(now \['m'\]\)"):
        check_resume(checkpoint, TrainingArgs(**tiny_args(tmp_path, eval_metrics=["m"])), 1)
    with pytest.raises(ValueError, match=r"world_size=1 processes \(now 2\)"):
        check_resume(checkpoint, args, 2)
    # the launcher's mixed precision (--mixed_precision left out): a resume under another one is refused
    run = {"args": recorded, "world_size": 1, "mixed_precision": "bf16"}
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "run": run}))
    with pytest.raises(ValueError, match=r"mixed_precision='bf16', from its launcher \(now 'no'\)"):
        check_resume(checkpoint, args, 1, "no")
    with pytest.raises(ValueError, match="random_states_0.pkl"):  # the same one: on to the random states
        check_resume(checkpoint, args, 1, "bf16")
    # an FSDP checkpoint resumed under DDP: named, not accelerate's FileNotFoundError half-way through loading
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "run": {**run, "distributed_type": "FSDP"}}))
    with pytest.raises(ValueError, match=r"distributed_type='FSDP', from its launcher \(now 'MULTI_CPU'\)"):
        check_resume(checkpoint, args, 1, "bf16", "MULTI_CPU")
    with pytest.raises(ValueError, match="random_states_0.pkl"):
        check_resume(checkpoint, args, 1, "bf16", "FSDP")


def test_a_model_that_sees_later_tokens_is_refused_as_a_language_model(tmp_path):
    text = tmp_path / "lm.txt"
    text.write_text("\n\n".join(["a b c d e f g h i j k l m n o p"] * 30))
    common = dict(task="causal_lm", model="config:bert", tokenizer="char", dataset=str(text), max_length=16,
                  num_epochs=1, output_dir=str(tmp_path / "run"), save_model=False)
    with pytest.raises(ValueError, match="not a causal language model: its predictions depend on later tokens.*"
                                         "is_decoder"):
        run_training(TrainingArgs(**common, model_config=TINY_BERT))
    assert not (tmp_path / "run").exists()
    result = run_training(TrainingArgs(**common, model_config={**TINY_BERT, "is_decoder": True}))
    assert result["final"]["eval_bpc"] > 1.0  # no longer reading the answer


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["model in the run's model/", "dataset is the output folder"])
def test_an_input_inside_what_the_run_writes_is_refused_before_any_write(tmp_path, where):
    """--model r3/model --output_dir r3 --overwrite_output_dir deleted the input model and trained from nothing
    that exists any more; a --dataset folder as the output folder got run_config.json and metrics.json,
    which every later use of the data then read as data."""
    out = tmp_path / "r3"
    args = tiny_args(tmp_path, output_dir=str(out), overwrite_output_dir=True)
    if where.startswith("model"):
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text("{}")  # a model saved there by an earlier run
        args.update(model=str(out / "model"), model_config=None)
    else:
        out.mkdir()
        (out / "train.csv").write_text((Path(args["dataset"]) / "train.csv").read_text())
        args.update(dataset=str(out))
    before = _files(out)
    with pytest.raises(ValueError, match=r"which this run writes \(--output_dir .*\): it would write over its own input"):
        run_training(TrainingArgs(**args))
    assert _files(out) == before


def test_a_resume_on_changed_data_is_refused(tmp_path):
    """Killed after a checkpoint, its train.csv relabelled at the same path, the run resumed on the new labels
    and wrote metrics.json as if it were one run."""
    args = tiny_args(tmp_path, num_epochs=1, checkpointing_steps=2, checkpoints_total_limit=None)
    run_training(TrainingArgs(**args))
    (Path(args["output_dir"]) / METRICS_FILE).unlink()  # as if killed after its last checkpoint
    train = Path(args["dataset"]) / "train.csv"
    original = train.read_bytes()
    rows = train.read_text().splitlines()
    train.write_text("\n".join([rows[0], *(r[:-1] + ("1" if r.endswith("0") else "0") for r in rows[1:])]) + "\n")
    with pytest.raises(ValueError, match=r"was made from other data: the files of .*data have changed since"):
        run_training(TrainingArgs(**args, resume_from_checkpoint="latest"))
    train.write_bytes(original)  # the data as it was: the resume goes on
    run_training(TrainingArgs(**args, resume_from_checkpoint="latest"))
    assert (Path(args["output_dir"]) / METRICS_FILE).is_file()

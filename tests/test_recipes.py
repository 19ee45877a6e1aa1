"""The Accelerate recipes: real gloo processes, kill-and-resume, bad input, the real RT task.

Multi-process and kill tests run tests/recipe_driver.py in subprocesses (one thread each),
so that every run being compared executes the same code under the same conditions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hf_adanorm.training import TrainingArgs, latest_checkpoint, run_training
from hf_adanorm.training.checkpoints import CHECKPOINT_DIR, METRICS_FILE, TMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "recipe_driver.py"
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # also keeps CPU round-off alike run to run


def write_sentiment_csvs(folder: Path, n_train=48, n_val=16, seed=0) -> Path:
    """A learnable toy task: the label is whether 'good' words outnumber 'bad' ones."""
    rng = random.Random(seed)
    good, bad, filler = ["good", "great", "fine"], ["bad", "awful", "poor"], ["film", "plot", "cast", "the", "a"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = []
        for i in range(n):
            label = i % 2
            words = rng.choices(good if label else bad, k=3) + rng.choices(filler, k=rng.randint(1, 5))
            rng.shuffle(words)
            rows.append((" ".join(words), label))
        with open(folder / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    return folder


def tiny_args(tmp_path, **overrides) -> dict:
    args = dict(task="classification", model="config:bert", tokenizer="word", model_config=TINY_BERT,
                dataset=str(write_sentiment_csvs(tmp_path / "data")), norm="adanorm", num_epochs=3,
                per_device_batch_size=8, learning_rate=2e-3, max_length=16, seed=3,
                output_dir=str(tmp_path / "run"), save_model=False)
    args.update(overrides)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_driver(args: dict, dump: Path, *, launcher=(), kill_at=None, expect_rc=0, timeout=120, driver=DRIVER):
    dump.mkdir(parents=True, exist_ok=True)
    args_file = dump / "args.json"
    args_file.write_text(json.dumps(args))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [*(launcher or [sys.executable]), str(driver), str(args_file), str(dump)]
    if kill_at is not None:
        command.append(str(kill_at))
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_here(args: dict) -> dict:
    """Train in this process (same single thread as the subprocesses); the final weights."""
    from hf_adanorm.training import classification, train
    model = train(TrainingArgs(**args), classification.build_task).model
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def weights(dump: Path, rank=0) -> dict:
    return load_file(str(dump / f"rank{rank}.safetensors"))


def metrics_of(args: dict) -> dict:
    return json.loads((Path(args["output_dir"]) / "metrics.json").read_text())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_same_global_batch(tmp_path):
    # global batch 16 = 2 processes x 4 x 2 accumulation steps = 1 process x 8 x 2; no dropout,
    # so the only difference left is round-off in the gradient all-reduce and padding.
    common = dict(model_config={**TINY_BERT, **NO_DROPOUT}, gradient_accumulation_steps=2, num_epochs=2)
    two = tiny_args(tmp_path, per_device_batch_size=4, output_dir=str(tmp_path / "two"), **common)
    one = tiny_args(tmp_path, per_device_batch_size=8, output_dir=str(tmp_path / "one"), **common)
    config = REPO / "recipes" / "configs" / "cpu_2proc.yaml"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--main_process_port", str(free_port())]
    run_driver({**two, "cpu": True}, tmp_path / "dump_two", launcher=launcher)
    single = train_here(one)

    seen = [json.loads((tmp_path / "dump_two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in seen] == [0, 1]
    assert all(s["world_size"] == 2 and s["distributed_type"] == "DistributedType.MULTI_CPU" for s in seen)
    run_config = json.loads((tmp_path / "two" / "run_config.json").read_text())
    assert run_config["world_size"] == 2 and run_config["global_batch_size"] == 16

    rank0, rank1 = weights(tmp_path / "dump_two", 0), weights(tmp_path / "dump_two", 1)
    initial = weights_at_init(tmp_path, common)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((rank0[n] - initial[n]).abs().max().item() for n in rank0)
    assert moved > 1e-3, "training did not change the weights: the comparison would prove nothing"

    h2, h1 = metrics_of(two)["history"], metrics_of(one)["history"]
    assert [(e["epoch"], e["step"]) for e in h2] == [(e["epoch"], e["step"]) for e in h1] == [(1, 3), (2, 6)]
    for e2, e1 in zip(h2, h1):
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            assert e2[key] == pytest.approx(e1[key], rel=1e-4, abs=1e-5), key


# The shipped configs, launched with accelerate's command-line overrides for what differs on
# 2 CPU processes; the drivers (each explains how it runs on CPU) report what took effect.
CPU_OVERRIDES = ["--mixed_precision", "no"]  # the shipped configs train in bf16 on GPUs
SHARDED_LAUNCHES = {  # shipped config, extra overrides, driver, distributed type
    # BERT's _no_split_modules also list BertEmbeddings, which accelerate 1.15 shards twice
    "fsdp2": ("fsdp.yaml", ["--fsdp_transformer_layer_cls_to_wrap", "BertLayer"], "fsdp_cpu_driver.py", "FSDP"),
    # the DeepSpeed config must repeat the recipe's accumulation and clipping (this test's 2 and 0.5)
    "deepspeed_zero2": ("deepspeed_zero2.yaml", ["--gradient_accumulation_steps", "2", "--gradient_clipping", "0.5"],
                        "deepspeed_cpu_driver.py", "DEEPSPEED"),
    "deepspeed_zero3": ("deepspeed_zero3.yaml", ["--gradient_accumulation_steps", "2", "--gradient_clipping", "0.5"],
                        "deepspeed_cpu_driver.py", "DEEPSPEED"),
}
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed")


def shipped_config_launcher(config: str, overrides=()) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "configs" / config), "--main_process_port", str(free_port()),
            *CPU_OVERRIDES, *overrides]


@pytest.mark.parametrize("launch", ["fsdp2", pytest.param("deepspeed_zero2", marks=NEEDS_DEEPSPEED),
                                    pytest.param("deepspeed_zero3", marks=NEEDS_DEEPSPEED)])
@pytest.mark.slow
def test_sharded_training_on_two_cpu_processes_saves_the_model_of_one_process(tmp_path, launch):
    # accelerate's FSDP / DeepSpeed path on 2 gloo ranks with the same global batch as 1 process,
    # clipping on; the final model is gathered, saved by the recipe and loaded with hf_adanorm.
    from transformers import AutoModelForSequenceClassification

    from hf_adanorm.checkpoint import from_pretrained
    config, overrides, driver, distributed_type = SHARDED_LAUNCHES[launch]
    common = dict(model_config={**TINY_BERT, **NO_DROPOUT}, gradient_accumulation_steps=2, num_epochs=2,
                  save_model=True, max_grad_norm=0.5)
    sharded = tiny_args(tmp_path, per_device_batch_size=4, output_dir=str(tmp_path / "sharded"), **common)
    one = tiny_args(tmp_path, per_device_batch_size=8, output_dir=str(tmp_path / "one"), **common)
    run_driver(sharded, tmp_path / "dump", launcher=shipped_config_launcher(config, overrides),
               driver=REPO / "tests" / driver)
    run_training(TrainingArgs(**one))

    seen = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["world_size"] == 2 and s["distributed_type"] == f"DistributedType.{distributed_type}" for s in seen)
    if launch == "fsdp2":  # each rank holds its half of the parameters
        assert all(s["fsdp_version"] == 2 and s["wrapped"] == ["BertLayer"] for s in seen)
        assert seen[0]["local_elements"] + seen[1]["local_elements"] == seen[0]["total_elements"]
        assert all(s["local_elements"] < 0.6 * s["total_elements"] for s in seen), "not sharded"
    else:
        assert all(s["zero_stage"] == int(launch[-1]) for s in seen)
        assert all((s["gradient_accumulation_steps"], s["gradient_clipping"]) == (2, 0.5) for s in seen)
    run_config = json.loads((tmp_path / "sharded" / "run_config.json").read_text())
    assert (run_config["world_size"], run_config["global_batch_size"]) == (2, 16)
    assert run_config["distributed_type"] == f"DistributedType.{distributed_type}"
    assert run_config["mixed_precision"] == "no"  # the override beat the config's bf16

    saved = json.loads((tmp_path / "sharded" / "model" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]  # not FSDP2's FSDPBert... class
    ours, single = (from_pretrained(AutoModelForSequenceClassification, tmp_path / run / "model").state_dict()
                    for run in ("sharded", "one"))
    initial = weights_at_init(tmp_path, common)
    assert ours.keys() == single.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((ours[n] - initial[n]).abs().max().item() for n in ours)
    assert moved > 1e-3, "training did not change the weights: the comparison would prove nothing"
    for e2, e1 in zip(metrics_of(sharded)["history"], metrics_of(one)["history"], strict=True):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-4, abs=1e-5)
        assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@NEEDS_DEEPSPEED
def test_deepspeed_on_cpu_is_refused_with_the_cpu_config_to_use(tmp_path):
    # without the test driver's gloo backend, accelerate would run every rank as a lone process
    proc = run_driver(tiny_args(tmp_path), tmp_path / "dump", launcher=shipped_config_launcher("deepspeed_zero2.yaml"),
                      expect_rc=1)
    assert "accelerate runs DeepSpeed on GPUs only; on CPU launch with recipes/configs/cpu_2proc.yaml" in proc.stderr
    assert not (tmp_path / "run").exists(), "something was written before the error"


def weights_at_init(tmp_path, common) -> dict:
    """The model as built (same seed), before any step: to check that training moved it."""
    from hf_adanorm.training import classification
    args = TrainingArgs(**tiny_args(tmp_path, output_dir=str(tmp_path / "init"), **common))
    torch.manual_seed(args.seed)
    return classification.build_task(args).model.state_dict()


@pytest.mark.slow
def test_sigkill_during_checkpoint_then_resume_equals_uninterrupted(tmp_path):
    # 6 steps per epoch, checkpoints every 4 steps: the 3rd checkpoint (step 12) is killed half
    # written, so the resume starts from step 8, mid-epoch 2, with dropout on.
    args = tiny_args(tmp_path, num_epochs=2, checkpointing_steps=4, output_dir=str(tmp_path / "killed"))
    reference = {**args, "output_dir": str(tmp_path / "reference")}
    run_driver(args, tmp_path / "dump_killed", kill_at=3, expect_rc=-9)

    checkpoints = Path(args["output_dir"]) / CHECKPOINT_DIR
    half_written = checkpoints / f"{TMP_PREFIX}step_12"
    assert (half_written / "model.safetensors").is_file(), "the kill did not hit a checkpoint write"
    assert latest_checkpoint(args["output_dir"]) == checkpoints / "step_8"
    assert not (Path(args["output_dir"]) / "metrics.json").exists()

    resumed = train_here({**args, "resume_from_checkpoint": "latest"})
    assert not half_written.exists(), "the leftover of the killed write was not cleaned up"
    run_config = json.loads((Path(args["output_dir"]) / "run_config.json").read_text())
    assert run_config["resumed_from"] == str(checkpoints / "step_8")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_12", "step_4", "step_8"]

    uninterrupted = train_here(reference)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resume"
    got, want = metrics_of(args), metrics_of(reference)
    assert got["history"] == want["history"] and got["final"] == want["final"]
    assert [e["step"] for e in want["history"]] == [6, 12]


@pytest.mark.slow
def test_two_processes_resumed_mid_epoch_log_the_uninterrupted_train_loss(tmp_path):
    # Each rank sums its own training losses; a checkpoint kept only the main process's sum, and a resume
    # gave it to every rank, so the train_loss of the epoch it resumed in was off (the weights were exact).
    import shutil
    args = tiny_args(tmp_path, per_device_batch_size=4, num_epochs=2, checkpointing_steps=2, cpu=True,
                     model_config={**TINY_BERT, **NO_DROPOUT}, output_dir=str(tmp_path / "straight"))
    config = REPO / "recipes" / "configs" / "cpu_2proc.yaml"
    launch = lambda: [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),  # noqa: E731
                      "--main_process_port", str(free_port())]
    run_driver(args, tmp_path / "dump_straight", launcher=launch())
    straight = metrics_of(args)
    resumed_dir = tmp_path / "resumed"  # the straight run as a kill after its step_2 checkpoint left it
    shutil.copytree(tmp_path / "straight", resumed_dir, ignore=shutil.ignore_patterns("metrics.json", "model"))
    for later in (resumed_dir / CHECKPOINT_DIR).iterdir():
        if later.name != "step_2":
            shutil.rmtree(later)
    resumed_args = {**args, "output_dir": str(resumed_dir), "resume_from_checkpoint": "latest"}
    run_driver(resumed_args, tmp_path / "dump_resumed", launcher=launch())
    resumed = metrics_of(resumed_args)
    assert [e["step"] for e in straight["history"]] == [6, 12]  # step_2 lies inside the first epoch
    assert resumed["history"] == straight["history"] and resumed["final"] == straight["final"]


def test_resume_from_an_explicit_checkpoint_and_refuse_to_mix_runs(tmp_path):
    args = TrainingArgs(**tiny_args(tmp_path, num_epochs=1, checkpointing_steps=2, checkpoints_total_limit=2))
    first = run_training(args)
    checkpoints = Path(args.output_dir) / CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_4", "step_6"]  # the newest two
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        run_training(args)  # a fresh run into a folder holding another run's checkpoints
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_training(TrainingArgs(**{**args.to_dict(), "resume_from_checkpoint": str(tmp_path / "nope")}))
    again = run_training(TrainingArgs(**{**args.to_dict(), "resume_from_checkpoint": str(checkpoints / "step_4")}))
    assert again["history"] == first["history"] and again["final"] == first["final"]


def test_a_run_killed_after_its_last_checkpoint_resumes_without_an_extra_step(tmp_path, monkeypatch):
    # 6 steps per epoch; max_steps=8 ends mid-epoch 2, and the kill comes after checkpoints/step_8, in the
    # final evaluation: the resume has nothing left to train (it used to train the rest of the epoch's batches)
    common = dict(num_epochs=2, max_steps=8, checkpointing_steps=4, lr_scheduler="constant")
    reference = run_training(TrainingArgs(**tiny_args(tmp_path, output_dir=str(tmp_path / "reference"), **common)))
    from hf_adanorm.training import loop

    evaluate, calls = loop.evaluate, []

    def killed_in_the_final_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 1's evaluation, then the final one
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    args = tiny_args(tmp_path, output_dir=str(tmp_path / "killed"), **common)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "evaluate", killed_in_the_final_evaluation)
        with pytest.raises(KeyboardInterrupt):
            run_training(TrainingArgs(**args))
    assert latest_checkpoint(args["output_dir"]) == Path(args["output_dir"]) / CHECKPOINT_DIR / "step_8"
    resumed = run_training(TrainingArgs(**args, resume_from_checkpoint="latest"))
    assert [e["step"] for e in resumed["history"]] == [e["step"] for e in reference["history"]] == [6, 8]
    assert resumed["history"] == reference["history"] and resumed["final"] == reference["final"]


def test_a_finished_run_is_refused_unless_overwrite_output_dir(tmp_path):
    args = tiny_args(tmp_path, num_epochs=1, checkpointing_steps=2, save_model=True)
    run_training(TrainingArgs(**args))
    run = Path(args["output_dir"])
    shutil.rmtree(run / CHECKPOINT_DIR)  # a run without checkpoints: metrics.json and model/ only
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    fresh = {**args, "checkpointing_steps": None}
    with pytest.raises(FileExistsError, match=r"results of another run \(metrics.json, model\).*overwrite_output_dir"):
        run_training(TrainingArgs(**fresh))
    with pytest.raises(FileExistsError, match=r"\(model\)"):  # killed after saving model/
        (run / METRICS_FILE).rename(run / "kept.json")
        run_training(TrainingArgs(**fresh, resume_from_checkpoint="latest"))  # nothing to resume
    (run / "kept.json").rename(run / METRICS_FILE)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}, "a refusal wrote"

    (run / CHECKPOINT_DIR / "step_99").mkdir(parents=True)  # stale, would fool a later "latest"
    (run / CHECKPOINT_DIR / "step_99" / "training_state.json").write_text("{}")
    again = run_training(TrainingArgs(**{**fresh, "overwrite_output_dir": True, "save_model": False}))
    assert not (run / CHECKPOINT_DIR).exists() and not (run / "model").exists()
    assert json.loads((run / METRICS_FILE).read_text())["final"] == again["final"]


def test_char_level_causal_lm_reports_bits_per_character(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join("the cat sat on the mat. " * 6 for _ in range(40)))
    args = TrainingArgs(task="causal_lm", model="config:gpt2", tokenizer="char", dataset=str(text),
                        model_config={"n_layer": 1, "n_embd": 32, "n_head": 2}, norm="layernorm_simple",
                        max_length=32, per_device_batch_size=8, max_steps=12, learning_rate=3e-3,
                        output_dir=str(tmp_path / "lm"))
    final = run_training(args)["final"]
    assert final["eval_perplexity"] == pytest.approx(torch.tensor(final["eval_loss"]).exp().item(), rel=1e-6)
    assert final["eval_bpc"] == pytest.approx(final["eval_loss"] / torch.log(torch.tensor(2.0)).item())
    vocab_size = json.loads((tmp_path / "lm" / "run_config.json").read_text())["vocab_size"]
    assert final["eval_bpc"] < math.log2(vocab_size) - 0.5, "not better than a uniform guess"
    saved = json.loads((tmp_path / "lm" / "model" / "config.json").read_text())
    assert saved["hf_adanorm"]["config"]["norm"] == "layernorm_simple"


class FixedLogits(torch.nn.Module):
    """Logits 0, plus ``margin`` on the true next token when ``margin`` is given (an oracle)."""

    def __init__(self, vocab_size: int, margin=None):
        super().__init__()
        self.vocab_size, self.margin = vocab_size, margin

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        if self.margin is not None:  # position t predicts token t + 1
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], self.margin)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("margin", [None, 2.0])
def test_causal_lm_evaluation_on_hand_computed_models(margin):
    from accelerate import Accelerator
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from hf_adanorm.training import causal_lm
    from hf_adanorm.training.loop import Task, evaluate
    vocab_size = 7
    stream = torch.randint(0, vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = causal_lm.group_texts(Dataset.from_dict({"input_ids": [stream]}), 16).with_format("torch")
    task = Task(model=None, tokenizer=None, splits={}, collate_fn=None, eval_step=causal_lm.eval_step,
                compute_metrics=lambda arrays: causal_lm.compute_metrics(arrays, char_level=True))
    loader = DataLoader(blocks, batch_size=5, collate_fn=default_data_collator)
    metrics = evaluate(Accelerator(cpu=True), FixedLogits(vocab_size, margin), loader, task)
    # uniform: ln V nats = log2 V bits per character; oracle: -ln(e^m / (e^m + V - 1)) per token,
    # which only a correct shift gives (predicting token t from position t would cost far more)
    expected = math.log(vocab_size) if margin is None else math.log(math.exp(margin) + vocab_size - 1) - margin
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["bpc"] == pytest.approx(expected / math.log(2), rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "rt-polarity").is_dir(), reason="needs ../shared/data/rt-polarity")
def test_minilm_on_rotten_tomatoes(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    from hf_adanorm.checkpoint import from_pretrained
    from hf_adanorm.training import classification, train
    args = TrainingArgs(model=minilm_path, dataset=str(SHARED_DATA / "rt-polarity"), norm="adanorm",
                        max_train_samples=32, max_eval_samples=32, max_steps=2, per_device_batch_size=16,
                        max_length=32, output_dir=str(tmp_path / "rt"))
    result = train(args, classification.build_task)
    assert {"eval_accuracy", "eval_f1", "test_accuracy", "test_loss"} <= set(result.metrics["final"])
    assert result.metrics["history"][-1]["step"] == 2
    assert result.metrics["model_format"] == "hf_adanorm.save_pretrained"
    run_config = json.loads((tmp_path / "rt" / "run_config.json").read_text())
    replaced = [e for e in run_config["patch_report"]["entries"] if e["action"] == "replaced"]
    assert len(replaced) == 13 and run_config["labels"] == ["0", "1"]

    reloaded = from_pretrained(AutoModelForSequenceClassification, tmp_path / "rt" / "model").eval()
    ids = torch.tensor([[101, 2307, 2143, 102]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)

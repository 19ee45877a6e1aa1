"""Mixed precision on CPU: bf16 really autocasts; fp16, which accelerate cannot do there, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from test_recipes import tiny_args

from hf_adanorm.training import TrainingArgs, parse_args, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with
    another mixed_precision; these tests switch it, so each run starts from a clean state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train_recording_dtypes(args: TrainingArgs):
    """Train; the dtypes that each watched module's forward produced, and the run's outputs."""
    from hf_adanorm.training import classification, train
    produced = {}

    def build_task(a):
        task = classification.build_task(a)
        for name, module in task.model.named_modules():
            if name.endswith(("layer.0.intermediate.dense", "layer.0.output.LayerNorm", "classifier")):
                module.register_forward_hook(
                    lambda _m, _i, out, name=name: produced.setdefault(name, set()).add(out.dtype))
        return task

    result = train(args, build_task)
    run_config = json.loads((Path(args.output_dir) / "run_config.json").read_text())
    return produced, result, run_config


@pytest.mark.parametrize("norm", ["adanorm", "layernorm"])
def test_bf16_on_cpu_trains_under_autocast(tmp_path, fresh_accelerate_state, norm):
    runs = {}
    for precision in ("bf16", "no"):
        AcceleratorState._reset_state(reset_partial_state=True)
        args = TrainingArgs(**tiny_args(tmp_path, norm=norm, mixed_precision=precision, num_epochs=1, cpu=True,
                                        output_dir=str(tmp_path / precision)))
        runs[precision] = train_recording_dtypes(args)
    (bf16_dtypes, bf16, bf16_config), (fp32_dtypes, fp32, fp32_config) = runs["bf16"], runs["no"]

    assert (bf16_config["mixed_precision"], fp32_config["mixed_precision"]) == ("bf16", "no")
    assert bf16_config["device"] == "cpu"
    # Linear layers compute in bf16 under autocast; the norms get the fp32 residual stream
    assert bf16_dtypes["bert.encoder.layer.0.intermediate.dense"] == {torch.bfloat16}
    assert bf16_dtypes["classifier"] == {torch.bfloat16}
    assert bf16_dtypes["bert.encoder.layer.0.output.LayerNorm"] == {torch.float32}
    assert all(dtypes == {torch.float32} for dtypes in fp32_dtypes.values())
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters()), "the weights must stay fp32"

    # same seed and data: bf16 round-off makes the runs differ, but only a little
    for key in ("train_loss", "eval_loss"):
        got, want = bf16.metrics["history"][-1][key], fp32.metrics["history"][-1][key]
        assert got != want and got == pytest.approx(want, rel=2e-2), key
    moved = [(bf16.model.state_dict()[n] - p).abs().max().item() for n, p in fp32.model.state_dict().items()]
    assert 0 < max(moved) < 0.05


def test_fp16_on_cpu_is_refused_before_anything_runs(tmp_path, fresh_accelerate_state, monkeypatch, capsys):
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU.*bf16"):
        TrainingArgs(**tiny_args(tmp_path, mixed_precision="fp16", cpu=True))
    with pytest.raises(SystemExit) as exit_:  # the recipes' command line
        parse_args("classification", ["--model", "m", "--dataset", "d.csv", "--cpu", "--mixed_precision", "fp16"])
    assert exit_.value.code == 2 and "fp16 mixed precision needs a GPU" in capsys.readouterr().err

    # what `accelerate launch --cpu --mixed_precision fp16` hands the run: accelerate itself would
    # train in fp32 (no autocast, no scaler) and report fp16
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    args = TrainingArgs(**tiny_args(tmp_path))
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        run_training(args)
    assert not Path(args.output_dir).exists(), "something was written before the error"

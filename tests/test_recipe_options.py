"""Recipe options beyond the loop itself: fold_affine on pre-LN and post-LN models, DeepSpeed config checks."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from test_recipes import (NEEDS_DEEPSPEED, REPO, TINY_BERT, free_port, run_driver, shipped_config_launcher,
                          tiny_args)

from hf_adanorm.cli import main
from hf_adanorm.training import TrainingArgs, parse_args, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def save_pretrained_like(model, folder: Path) -> str:
    """Save ``model`` with random LayerNorm gains and biases, as a pretrained model has them
    (from a config they are 1 and 0, and dropping them would change nothing)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)
    return str(folder)


def test_fold_affine_is_a_recipe_and_compare_option(monkeypatch, tmp_path):
    args = parse_args("causal_lm", ["--model", "m", "--dataset", "d.txt", "--norm", "layernorm_simple",
                                    "--fold_affine"])
    assert args.fold_affine and args.norm_config().fold_affine
    assert not parse_args("causal_lm", ["--model", "m", "--dataset", "d.txt", "--norm", "adanorm"]).fold_affine

    given = {}  # what compare hands every run, caught before any training

    def fake_compare(setup, norms, seeds, output_dir, **kwargs):
        given.update(setup)
        report = Path(output_dir) / "report.md"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("")
        return report

    monkeypatch.setattr("hf_adanorm.compare.compare", fake_compare)
    assert main(["compare", "--model", str(tmp_path), "--dataset", "d.csv", "--fold_affine",
                 "--norms", "layernorm", "layernorm_simple", "--output-dir", str(tmp_path / "o")]) == 0
    assert given == {"model": str(tmp_path), "dataset": "d.csv", "fold_affine": True}


def test_pre_ln_gpt2_is_folded_and_trains(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from hf_adanorm.checkpoint import from_pretrained
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join("the cat sat on the mat. " * 6 for _ in range(40)))
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=64, bos_token_id=0,
                        eos_token_id=0)
    pretrained = save_pretrained_like(AutoModelForCausalLM.from_config(config), tmp_path / "pretrained")
    args = TrainingArgs(task="causal_lm", model=pretrained, tokenizer="char", dataset=str(text),
                        norm="layernorm_simple", fold_affine=True, max_length=32, per_device_batch_size=8,
                        max_steps=12, learning_rate=3e-3, output_dir=str(tmp_path / "lm"))
    metrics = run_training(args)

    run_config = json.loads((tmp_path / "lm" / "run_config.json").read_text())
    assert run_config["args"]["fold_affine"] is True
    fold = run_config["fold"]
    assert fold == metrics["fold"]
    assert fold["folded"] == {"transformer.h.0.ln_1": ["transformer.h.0.attn.c_attn"],
                              "transformer.h.0.ln_2": ["transformer.h.0.mlp.c_fc"],
                              "transformer.ln_f": ["lm_head"]}
    assert fold["not_foldable"] == {} and fold["added_bias"] == ["lm_head"]
    assert fold["output_drift"] < 1e-5  # the gains and biases (far from 1 and 0) were kept exactly
    entries = run_config["patch_report"]["entries"]
    assert all(e["reason"].startswith("affine folded into") for e in entries if e["action"] == "replaced")
    uniform_bits = math.log2(config.vocab_size)  # a guess spread over the model's outputs
    assert metrics["final"]["eval_bpc"] < uniform_bits - 0.5, "did not train"

    saved = json.loads((tmp_path / "lm" / "model" / "config.json").read_text())
    assert saved["hf_adanorm"]["fold"]["folded"] == fold["folded"]
    reloaded = from_pretrained(AutoModelForCausalLM, tmp_path / "lm" / "model")
    assert reloaded.lm_head.bias is not None  # the folded ln_f bias, trained


def test_post_ln_bert_trains_unfolded_and_says_so(tmp_path, caplog):
    # patch_model does not refuse post-LN norms: it reports them 'not foldable' with their drift
    # and replaces them anyway. The run then trains without those gains and biases, which the
    # recipe must not do silently.
    from transformers import AutoModelForSequenceClassification, BertConfig
    model = AutoModelForSequenceClassification.from_config(BertConfig(**TINY_BERT, vocab_size=64))
    pretrained = save_pretrained_like(model, tmp_path / "pretrained")
    args = TrainingArgs(**tiny_args(tmp_path, model=pretrained, norm="layernorm_simple", fold_affine=True,
                                    num_epochs=1))
    with caplog.at_level(logging.WARNING):
        metrics = run_training(args)

    fold = json.loads((Path(args.output_dir) / "run_config.json").read_text())["fold"]
    assert fold == metrics["fold"]
    assert {"bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.output.LayerNorm",
            "bert.encoder.layer.1.attention.output.LayerNorm"} <= set(fold["not_foldable"])
    assert all("residual" in e["reason"] and e["drift"] > 1e-2 for name, e in fold["not_foldable"].items()
               if name.endswith("attention.output.LayerNorm"))
    assert fold["output_drift"] > 1e-2  # the model's function changed
    warnings = [r.getMessage() for r in caplog.records if "fold_affine" in r.getMessage()]
    assert len(warnings) == 1 and f"{len(fold['not_foldable'])} of 5 norms are not foldable" in warnings[0]
    assert f"{fold['output_drift']:.3g}" in warnings[0]
    assert metrics["history"][-1]["step"] == 6


def test_the_baseline_ignores_fold_affine(tmp_path, caplog):
    # the layernorm baseline is not patched: its norms keep their gain and bias, nothing to fold
    # (accepted rather than refused, so that `compare --fold_affine` can include the baseline)
    with caplog.at_level(logging.WARNING):
        metrics = run_training(TrainingArgs(**tiny_args(tmp_path, norm="layernorm", fold_affine=True,
                                                        max_steps=1)))
    assert metrics["fold"] is None
    assert not [r for r in caplog.records if "fold_affine" in r.getMessage()]


@pytest.mark.slow
@NEEDS_DEEPSPEED
def test_a_deepspeed_config_that_disagrees_with_the_run_is_refused(tmp_path):
    # the shipped ZeRO-2 config accumulates 1 micro-batch and clips at 1.0: DeepSpeed, not the
    # loop, would do both, so a run asking for 2 and 0.5 would silently train otherwise
    args = tiny_args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.5)
    proc = run_driver(args, tmp_path / "dump", launcher=shipped_config_launcher("deepspeed_zero2.yaml"),
                      driver=REPO / "tests" / "deepspeed_cpu_driver.py", expect_rc=1)
    assert ("the DeepSpeed config has gradient_accumulation_steps 1 (the run's --gradient_accumulation_steps: 2) "
            "and gradient_clipping 1.0 (the run's --max_grad_norm: 0.5)") in proc.stderr
    assert "--gradient_accumulation_steps 2 --gradient_clipping 0.5" in proc.stderr
    assert not (tmp_path / "run").exists(), "something was written before the error"


@pytest.mark.slow
@pytest.mark.parametrize("config, world_size", [("single_gpu.yaml", 1), ("multi_gpu.yaml", 2)])
def test_the_gpu_configs_launch_as_shipped_on_cpu(tmp_path, config, world_size):
    # No override at all (bf16 included): the launcher starts the config's processes, the
    # recipe's --cpu joins them with gloo and runs CPU bf16 autocast. What differs on GPUs is
    # only the device and NCCL.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes" / "configs" / config), "--main_process_port", str(free_port())]
    args = tiny_args(tmp_path, cpu=True, num_epochs=1, per_device_batch_size=4)
    run_driver(args, tmp_path / "dump", launcher=launcher)
    seen = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert all(s["world_size"] == world_size for s in seen)
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (run_config["world_size"], run_config["mixed_precision"]) == (world_size, "bf16")
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["eval_loss"])

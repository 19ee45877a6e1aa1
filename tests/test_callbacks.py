"""Trainer integration: PatchCallback, the gradient statistics, the monitors, checkpoints, resume."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)

from hf_adanorm import is_patched, patch_model
from hf_adanorm.callbacks import (AdaNormMonitorCallback, AffineDriftCallback, NormGradientStatsCallback,
                                  PatchCallback)
from hf_adanorm.grad_stats import STATISTICS, GradientProbe, find_norm_sites, row_sigma

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rt-polarity"

# (patch_model arguments or None for the original LayerNorms, how the mean's derivative acts)
NORM_KINDS = {
    "original": (None, "recentres"),
    "layernorm_simple": (("layernorm_simple", {}), "recentres"),
    "adanorm": (("adanorm", {}), "recentres"),
    "detach_mean": (("detachnorm", {"detach": "mean"}), "mean detached"),
    "no_norm": (("no_norm", {}), "identity"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def total_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def train_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-3, report_to="none", use_cpu=True,
                    disable_tqdm=True, logging_steps=1000, save_strategy="no", seed=0)
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


class HookSpy(TrainerCallback):
    """Placed after the monitors: counts the hooks they left on the model, and sees their logs."""

    def __init__(self):
        self.at_step_begin, self.at_step_end, self.logged_keys = {}, {}, set()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_step_begin[state.global_step + 1] = total_hooks(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at_step_end[state.global_step] = total_hooks(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged_keys |= set(logs)


# --------------------------------------------------------------------------- the probe itself
class ResidualBlock(nn.Module):
    """``out = norm(h) + h``: the residual branch also reads ``h``, so dL/dh != the norm's share."""

    def __init__(self, size: int):
        super().__init__()
        self.lin = nn.Linear(size, size)
        self.norm = nn.LayerNorm(size)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    by_keyword = False  # call the norm as norm(input=h), as e.g. transformers' norm(hidden_states=h)

    def forward(self, x):
        h = self.lin(x)
        if self.by_keyword:
            name = next(iter(inspect.signature(self.norm.forward).parameters))
            return self.norm(**{name: h}) + h
        return self.norm(h) + h


@pytest.mark.parametrize("by_keyword", [False, True])
@pytest.mark.parametrize("kind", list(NORM_KINDS))
def test_probe_matches_an_autograd_reference(kind, by_keyword):
    torch.manual_seed(0)
    block = ResidualBlock(24)
    block.by_keyword = by_keyword
    patch = NORM_KINDS[kind][0]
    if patch:
        patch_model(block, patch[0], **patch[1])
    x = torch.randn(3, 5, 24)
    w = torch.randn(3, 5, 24) + 0.5  # the gradient at the norm's output; non-zero mean per row
    w[0, 0] = 0.0  # a row with no gradient (like padding) is left out

    # Reference: the norm's own input gradient, by autograd, on a detached copy of its input.
    h = block.lin(x).detach().requires_grad_()
    (dx,) = torch.autograd.grad((w * block.norm(h)).sum(), h)
    site = find_norm_sites(block)[0]
    sigma = row_sigma(h.detach().reshape(-1, 24), site)[1:]
    g, dx = w.reshape(-1, 24)[1:], dx.reshape(-1, 24)[1:]
    expected = {
        "grad_out_mean": g.mean(-1).abs().mean(), "grad_out_var": g.var(-1, correction=0).mean(),
        "grad_in_mean": dx.mean(-1).abs().mean(), "grad_in_var": dx.var(-1, correction=0).mean(),
        "recentring": (sigma * dx.mean(-1).abs()).sum() / g.mean(-1).abs().sum(),
        "rescaling": (sigma ** 2 * dx.var(-1, correction=0)).sum() / g.var(-1, correction=0).sum(),
    }

    block.zero_grad()
    (w * block(x)).sum().backward()
    plain_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    probe = GradientProbe([site])
    probe.attach()
    assert probe.num_hooks == 2
    (w * block(x)).sum().backward()
    probe.detach()
    assert total_hooks(block) == 0
    measured = probe.collect()["norm"]

    for name in STATISTICS:
        assert measured[name] == pytest.approx(expected[name].item(), rel=1e-4, abs=1e-6), name  # abs: float32 round-off of a zero mean
    # Measuring changes no gradient.
    assert all(torch.equal(p.grad, q) for p, q in zip(block.parameters(), plain_grads))
    # The controlled case of the paper's Theorem 1.
    if NORM_KINDS[kind][1] == "recentres":
        assert measured["recentring"] < 1e-5
    else:
        assert measured["recentring"] == pytest.approx(1.0, abs=1e-5)
    if kind in ("layernorm_simple", "detach_mean"):
        assert measured["rescaling"] <= 1 + 1e-5
    if kind == "no_norm":
        assert measured["rescaling"] == pytest.approx(1.0, abs=1e-6)


def test_the_statistics_are_of_the_unscaled_gradients_under_a_grad_scaler():
    """fp16 training backpropagates the loss times the GradScaler's scale (accelerate's optimizer wrapper
    holds the scaler, and Trainer hands callbacks that wrapper): the logged means and variances are the
    real gradient's, not 1024 or 65536 times them."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState
    torch.manual_seed(0)
    block = ResidualBlock(24)
    x, w = torch.randn(3, 5, 24), torch.randn(3, 5, 24) + 0.5

    def measure(scaler):
        monitor = NormGradientStatsCallback(every_n_steps=1)
        state, control = TrainerState(), TrainerControl()
        monitor.on_train_begin(None, state, control, model=block)
        monitor.on_step_begin(None, state, control, optimizer=SimpleNamespace(scaler=scaler))
        loss = (w * block(x)).sum()
        (loss if scaler is None else scaler.scale(loss)).backward()
        monitor.on_pre_optimizer_step(None, state, control)
        return monitor._pending

    plain, scaled = measure(None), measure(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert plain["norm_grad/norm/grad_out_var"] > 0
    assert scaled.keys() == plain.keys()
    for key, value in plain.items():
        assert scaled[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adanorm_monitor_on_a_hand_computed_case(dtype):
    # In bf16 too: y is measured in float32 (a bf16 y = 1.734 would put factor_min 3% off).
    from transformers import TrainerControl, TrainerState
    model = nn.Sequential(nn.LayerNorm(4)).to(dtype)
    patch_model(model, "adanorm", k=0.6, C=2.0)
    monitor = AdaNormMonitorCallback(every_n_steps=1)
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(None, state, control, model=model)
    monitor.on_step_begin(None, state, control)
    # y = (-1, -1, -1, 3) / sqrt(3): only the last element has k|y| = 1.04 >= 1.
    model(torch.tensor([[0.0, 0.0, 0.0, 10.0], [1.0, -1.0, 1.0, -1.0]], dtype=dtype))
    monitor.on_pre_optimizer_step(None, state, control)
    assert total_hooks(model) == 0
    monitor.on_step_end(None, state, control)
    assert control.should_log
    logs = {}
    monitor.on_log(None, state, control, logs=logs)
    y_max = 3 / math.sqrt(3)
    assert logs["adanorm/0/frac_k_abs_y_ge_1"] == pytest.approx(1 / 8)
    assert logs["adanorm/0/factor_min"] == pytest.approx(2.0 * (1 - 0.6 * y_max), rel=1e-4)
    assert logs["adanorm/0/factor_max"] == pytest.approx(2.0 * (1 + 0.6 * 1.0), rel=1e-4)  # y = -1, row 2
    assert logs["adanorm/all/frac_k_abs_y_ge_1"] == logs["adanorm/0/frac_k_abs_y_ge_1"]


# --------------------------------------------------------------------------- end to end on MiniLM
@pytest.fixture(scope="module")
def rt_polarity(minilm_path, tmp_path_factory):
    if not (DATA / "train.csv").is_file():
        pytest.skip(f"rt-polarity data not found at {DATA}")
    from datasets import load_dataset
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    data = load_dataset("csv", data_files={"train": str(DATA / "train.csv")}, split="train",
                        cache_dir=str(tmp_path_factory.mktemp("hf_datasets")))
    data = data.shuffle(seed=0).select(range(24))
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=32),
                    batched=True, remove_columns=["text"])
    return data, tokenizer


@pytest.mark.parametrize("kind", list(NORM_KINDS))
def test_minilm_finetune_logs_the_statistics_the_theory_predicts(kind, minilm_path, rt_polarity, tmp_path):
    from transformers import AutoModelForSequenceClassification
    data, tokenizer = rt_polarity
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    patch, effect = NORM_KINDS[kind]
    spy = HookSpy()
    callbacks = [NormGradientStatsCallback(every_n_steps=2)]
    if patch:
        callbacks.insert(0, PatchCallback(patch[0], **patch[1]))
    if kind == "adanorm":
        callbacks.append(AdaNormMonitorCallback(every_n_steps=2))
    if kind == "original":
        callbacks.append(AffineDriftCallback(every_n_steps=2))
    trainer = Trainer(model, train_args(tmp_path, max_steps=2, learning_rate=5e-5),
                      train_dataset=data, processing_class=tokenizer, callbacks=callbacks + [spy])
    assert is_patched(model) == bool(patch)
    trainer.train()

    # Hooks only on the measuring step (2), and none left once its backward is done:
    # two per norm for the gradient probe, one per AdaNorm for the monitor.
    assert spy.at_step_begin == {1: 0, 2: 2 * 13 + (13 if kind == "adanorm" else 0)}
    assert spy.at_step_end == {1: 0, 2: 0}
    (logged,) = [entry for entry in trainer.state.log_history if "norm_grad/all/recentring" in entry]
    assert logged["step"] == 2
    assert "norm_grad/all/recentring" in spy.logged_keys  # callbacks after the monitor see the values
    layers = {key.split("/")[1] for key in logged if key.startswith("norm_grad/")} - {"all"}
    assert len(layers) == 13
    for layer in layers:
        stats = {name: logged[f"norm_grad/{layer}/{name}"] for name in STATISTICS}
        assert all(math.isfinite(v) for v in stats.values()), (layer, stats)
        assert stats["grad_out_var"] > 0
        if effect == "recentres":
            assert stats["recentring"] < 1e-3, (layer, stats)
        else:
            assert stats["recentring"] == pytest.approx(1.0, abs=1e-3), (layer, stats)
        if kind in ("layernorm_simple", "detach_mean"):
            assert stats["rescaling"] <= 1 + 1e-4, (layer, stats)
        if kind == "no_norm":
            assert stats["rescaling"] == pytest.approx(1.0, abs=1e-4)
    if kind == "adanorm":
        frac, low, high = (logged[f"adanorm/all/{k}"] for k in ("frac_k_abs_y_ge_1", "factor_min", "factor_max"))
        # phi = C(1 - k y) leaves (0, 2C) exactly where k|y| >= 1 (C = 1 here); pretrained
        # MiniLM has rare outliers |y| > 10, so both can happen.
        assert 0.0 <= frac < 0.01 and low < 1 < high
        assert (frac > 0) == (low <= 0 or high >= 2)
    if kind == "original":
        drift = [logged[f"affine/{layer}/gain_dev"] for layer in layers]
        assert all(math.isfinite(v) and v > 0 for v in drift)
        assert math.isfinite(logged["affine/all/bias_norm"])


def test_with_gradient_accumulation_the_hooks_span_every_micro_batch(token_dataset, tmp_path):
    class MicroBatchSpy(HookSpy):
        def on_substep_end(self, args, state, control, model=None, **kwargs):
            self.at_step_end[("after first micro-batch of", state.global_step + 1)] = total_hooks(model)

    spy = MicroBatchSpy()
    monitor = NormGradientStatsCallback(every_n_steps=2)
    Trainer(tiny_bert(), train_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
            train_dataset=token_dataset, callbacks=[monitor, spy]).train()
    assert spy.at_step_end == {("after first micro-batch of", 1): 0, 1: 0,
                               ("after first micro-batch of", 2): 2 * 5, 2: 0}
    assert monitor.probe.num_hooks == 0

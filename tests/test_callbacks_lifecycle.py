"""Trainer integration over a run's life: checkpoints and resume with a patched model, the patch
record, when PatchCallback may patch, and the callbacks' refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_callbacks import HookSpy, tiny_bert, train_args
from torch import nn
from transformers import BertForSequenceClassification, Trainer, TrainerCallback

from hf_adanorm import get_patch_record, is_patched, patch_model
from hf_adanorm.callbacks import (PATCH_RECORD_FILE, AdaNormMonitorCallback, AffineDriftCallback,
                                  NormGradientStatsCallback, PatchCallback, write_patch_record)
from hf_adanorm.grad_stats import STATISTICS

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- checkpoints and resume
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_a_patched_run_exactly(token_dataset, tmp_path):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3)

    straight = tiny_bert()
    Trainer(straight, train_args(tmp_path / "straight", **settings), train_dataset=token_dataset,
            callbacks=[PatchCallback("adanorm", k=0.2)]).train()

    # Interrupted after the checkpoint at step 3 (and measured on the way: measuring must not
    # change training), then resumed by a fresh process-like setup: new model, new Trainer.
    first = tiny_bert()
    Trainer(first, train_args(tmp_path / "resumed", **settings), train_dataset=token_dataset,
            callbacks=[PatchCallback("adanorm", k=0.2), NormGradientStatsCallback(every_n_steps=2),
                       StopAt(3)]).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    record = get_patch_record(first)
    assert json.loads((checkpoint / PATCH_RECORD_FILE).read_text()) == record
    assert json.loads((checkpoint / "config.json").read_text())["hf_adanorm"] == record
    assert record["config"]["k"] == 0.2 and len(record["modules"]) == 5
    # The checkpoint folder is a patched model that hf_adanorm's loader reads as it is.
    from hf_adanorm.checkpoint import from_pretrained
    loaded = from_pretrained(BertForSequenceClassification, str(checkpoint))
    assert get_patch_record(loaded) == record
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in first.state_dict().items())

    resumed = tiny_bert(seed=1)  # different initial weights: everything must come from the checkpoint
    Trainer(resumed, train_args(tmp_path / "resumed", **settings), train_dataset=token_dataset,
            callbacks=[PatchCallback("adanorm", k=0.2), NormGradientStatsCallback(every_n_steps=2)]
            ).train(resume_from_checkpoint=str(checkpoint))

    assert get_patch_record(resumed) == record
    final_straight, final_resumed = straight.state_dict(), resumed.state_dict()
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        assert torch.equal(value, final_resumed[key]), key
    assert not torch.equal(first.classifier.weight, straight.classifier.weight)  # training moved on

    # Resuming under other norms would silently continue a different model: refused.
    for other in ([PatchCallback("adanorm", k=0.1)], [PatchCallback("layernorm_simple")]):
        trainer = Trainer(tiny_bert(), train_args(tmp_path / "resumed", **settings),
                          train_dataset=token_dataset, callbacks=other)
        with pytest.raises(RuntimeError, match="Resume with the same PatchCallback arguments"):
            trainer.train(resume_from_checkpoint=str(checkpoint))


def test_resume_accepts_the_same_tuple_include_after_the_json_round_trip(token_dataset, tmp_path):
    # the checkpoint's config.json holds include as a JSON list; the callback was given a tuple
    include = ("attention.output.LayerNorm",)
    first = tiny_bert()
    Trainer(first, train_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
            train_dataset=token_dataset, callbacks=[PatchCallback("adanorm", include=include)]).train()
    assert len(get_patch_record(first)["modules"]) == 2  # one per layer
    resumed = tiny_bert(seed=1)
    Trainer(resumed, train_args(tmp_path, max_steps=3), train_dataset=token_dataset,
            callbacks=[PatchCallback("adanorm", include=include)]
            ).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert get_patch_record(resumed)["modules"] == get_patch_record(first)["modules"]


def test_patch_record_is_added_to_a_config_that_lacks_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    record = {"format_version": 1, "config": {"norm": "adanorm"}, "modules": {}}
    write_patch_record(tmp_path, record)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "bert", "hidden_size": 32, "hf_adanorm": record}
    assert json.loads((tmp_path / PATCH_RECORD_FILE).read_text()) == record


@pytest.mark.parametrize("added_late", [False, True])
def test_monitor_values_reach_the_report_to_integrations(token_dataset, tmp_path, added_late):
    """Trainer runs report_to callbacks before the user's: the monitors move themselves ahead."""
    reporter = HookSpy()  # stands in for TensorBoard/W&B, which sit before user callbacks
    monitor = NormGradientStatsCallback(every_n_steps=1)
    trainer = Trainer(tiny_bert(), train_args(tmp_path, max_steps=1), train_dataset=token_dataset,
                      callbacks=[reporter] + ([] if added_late else [monitor]))
    if added_late:
        trainer.add_callback(monitor)  # after on_init_end: moved on on_train_begin instead
    trainer.train()
    callbacks = trainer.callback_handler.callbacks
    assert callbacks.index(monitor) < callbacks.index(reporter)
    assert {f"norm_grad/bert.encoder.layer.1.output.LayerNorm/{s}" for s in STATISTICS} <= reporter.logged_keys


# --------------------------------------------------------------------------- PatchCallback timing
def test_patch_callback_patches_before_the_optimizer_exists(token_dataset, tmp_path):
    model = tiny_bert()
    trainer = Trainer(model, train_args(tmp_path, max_steps=1), train_dataset=token_dataset,
                      callbacks=[PatchCallback("layernorm_simple")])
    assert is_patched(model) and trainer.optimizer is None
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any("LayerNorm" in name for name, _ in model.named_parameters())
    # A second Trainer on the same model with the same patch is a no-op; a different one is an error.
    Trainer(model, train_args(tmp_path), callbacks=[PatchCallback("layernorm_simple")])
    with pytest.raises(RuntimeError, match="already patched"):
        Trainer(model, train_args(tmp_path), callbacks=[PatchCallback("adanorm")])
    # Patched by hand before building an optimizer: handing both to the Trainer is fine.
    Trainer(model, train_args(tmp_path), optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
            callbacks=[PatchCallback("layernorm_simple")])


def test_patch_callback_refuses_when_it_is_too_late(token_dataset, tmp_path, state_of, assert_unchanged):
    model = tiny_bert()
    before = state_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="optimizer"):
        Trainer(model, train_args(tmp_path), optimizers=(optimizer, None), callbacks=[PatchCallback()])
    assert_unchanged(model, before)

    with pytest.raises(RuntimeError, match="wrapped by DataParallel"):
        PatchCallback().on_init_end(None, None, None, model=nn.DataParallel(model))
    assert_unchanged(model, before)

    trainer = Trainer(model, train_args(tmp_path, max_steps=1), train_dataset=token_dataset)
    trainer.add_callback(PatchCallback())  # after construction: the optimizer comes first
    with pytest.raises(RuntimeError, match="not the one patched"):
        trainer.train()
    assert not is_patched(model)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("callback", [NormGradientStatsCallback, AdaNormMonitorCallback, AffineDriftCallback])
@pytest.mark.parametrize("interval", [0, -3, 2.5, True, "10"])
def test_interval_must_be_a_positive_integer(callback, interval):
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        callback(every_n_steps=interval)


def test_unknown_norm_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown norm 'adanrom'.*adanorm"):
        PatchCallback("adanrom")
    with pytest.raises(TypeError, match="unknown patch_model option"):
        PatchCallback("adanorm", kk=0.1)


def test_monitors_without_their_norms_say_so(state_of, assert_unchanged):
    no_norm = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = state_of(no_norm)
    with pytest.raises(ValueError, match="no LayerNorm/RMSNorm-like module"):
        NormGradientStatsCallback().on_train_begin(None, None, None, model=no_norm)
    with pytest.raises(ValueError, match="no LayerNorm-like module"):
        PatchCallback().on_init_end(None, None, None, model=no_norm)
    assert_unchanged(no_norm, before)

    unpatched = tiny_bert()
    with pytest.raises(ValueError, match="no AdaNorm module"):
        AdaNormMonitorCallback().on_train_begin(None, None, None, model=unpatched)
    patch_model(unpatched, "adanorm")
    with pytest.raises(ValueError, match="no unpatched norm with a gain or bias"):
        AffineDriftCallback().on_train_begin(None, None, None, model=unpatched)

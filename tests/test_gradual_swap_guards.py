"""GradualSwapCallback never leaves a model or a number that silently means something else: a checkpoint
written inside the ramp is refused by both readers and by PatchCallback, a run too short for its ramp and a
best-model choice among blended checkpoints are refused, a resume must continue the same swap, and the
monitors measure the new norms, never the frozen originals."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, Trainer,
                          TrainingArguments)

import hf_adanorm
from hf_adanorm.blend import BlendedNorm
from hf_adanorm.portable import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

RAMP = 3


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))


def train(folder, dataset, callbacks, seed=0, resume=None, **settings):
    options = dict(per_device_train_batch_size=4, max_steps=5, report_to=[], use_cpu=True, save_strategy="steps",
                   save_steps=2, disable_tqdm=True, seed=seed)
    options.update(settings)
    trainer = Trainer(tiny_bert(seed), TrainingArguments(str(folder), **options), train_dataset=dataset,
                      eval_dataset=dataset, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
def test_a_checkpoint_inside_the_ramp_is_refused_by_both_readers_and_by_patch_callback(tmp_path, token_dataset):
    train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)])
    inside, after = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"  # alpha 1/3 at step 2; 1 from step 4
    record = json.loads((inside / "config.json").read_text())["hf_adanorm"]
    assert record["swap_in_progress"] == {name: pytest.approx(1 / 3) for name in record["modules"]}
    for load in (lambda folder: hf_adanorm.from_pretrained(AutoModelForSequenceClassification, folder),
                 lambda folder: AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)):
        with pytest.raises(Exception, match="saved while its norms were still being blended in") as refused:
            load(inside)
        assert type(refused.value).__name__ == CheckpointError.__name__  # the remote code's has its own class
        assert not any(isinstance(m, BlendedNorm) for m in load(after).modules())
    with pytest.raises(RuntimeError, match="inside GradualSwapCallback's ramp.*resume it with the same"):
        train(tmp_path, token_dataset, [hf_adanorm.PatchCallback("adanorm")], resume=str(inside))


@pytest.mark.slow
def test_a_checkpoint_from_before_the_swap_file_still_resumes(tmp_path, token_dataset):
    train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)])
    (tmp_path / "checkpoint-2" / "hf_adanorm_swap.json").unlink()  # as written before every checkpoint had it
    train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)],
          resume=str(tmp_path / "checkpoint-2"))  # its weights hold the blended originals: a swap's checkpoint


@pytest.mark.slow
def test_a_resume_must_continue_the_same_swap(tmp_path, token_dataset):
    train(tmp_path / "patched", token_dataset, [hf_adanorm.PatchCallback("adanorm")])
    with pytest.raises(RuntimeError, match="was not trained with GradualSwapCallback"):
        train(tmp_path / "patched", token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)],
              resume=str(tmp_path / "patched" / "checkpoint-2"))
    train(tmp_path / "swap", token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)])
    with pytest.raises(RuntimeError, match="another swap \\(ramp_steps: 3 then, 4 now\\)"):
        train(tmp_path / "swap", token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=4)],
              resume=str(tmp_path / "swap" / "checkpoint-2"), max_steps=6)


@pytest.mark.parametrize("settings, message", [
    (dict(max_steps=RAMP), "ramp_steps=3 is not below the run's 3 steps"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=2),
     "load_best_model_at_end: the evaluation at step 2 sees the norms still blended in"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch", max_steps=-1,
          num_train_epochs=2, per_device_train_batch_size=8),  # 3 steps an epoch: the first evaluation at step 3
     "load_best_model_at_end: the evaluation at step 3 sees the norms still blended in"),
])
def test_a_run_whose_results_would_not_describe_the_returned_model_is_refused_before_training(
        tmp_path, token_dataset, settings, message):
    with pytest.raises(ValueError, match=message):
        train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)], **settings)
    assert not list(tmp_path.glob("checkpoint-*"))


def test_an_evaluation_outside_training_is_not_refused(tmp_path, token_dataset):
    swap = hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=8, report_to=[], use_cpu=True,
                             load_best_model_at_end=True, eval_strategy="steps", eval_steps=4, save_steps=4)
    trainer = Trainer(tiny_bert(), args, train_dataset=token_dataset, eval_dataset=token_dataset, callbacks=[swap])
    assert "eval_loss" in trainer.evaluate()  # before train(): at alpha 0, the original model; it picks nothing


def test_best_model_selection_after_the_ramp_is_allowed(tmp_path, token_dataset):
    trainer = train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)],
                    load_best_model_at_end=True, eval_strategy="steps", eval_steps=4, save_steps=4, max_steps=8)
    assert trainer.state.best_model_checkpoint is not None
    assert not any(isinstance(m, BlendedNorm) for m in trainer.model.modules())


def test_training_stopped_inside_the_ramp_says_so(tmp_path, token_dataset, caplog):
    from transformers import TrainerCallback

    class StopAtStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    with caplog.at_level(logging.WARNING, logger="hf_adanorm.convert.callback"):
        train(tmp_path, token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP), StopAtStepOne()],
              save_strategy="no")
    assert "training ended inside the ramp (step 1 of 3)" in caplog.text


def test_the_monitors_measure_the_new_norms_not_the_frozen_originals(tmp_path, token_dataset):
    from hf_adanorm import AdaNormMonitorCallback, AffineDriftCallback, NormGradientStatsCallback
    swap = hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP)
    grads, ada = NormGradientStatsCallback(every_n_steps=1), AdaNormMonitorCallback(every_n_steps=1)
    trainer = train(tmp_path, token_dataset, [swap, grads, ada], save_strategy="no", logging_steps=1)
    names = set(hf_adanorm.get_patch_record(trainer.model)["modules"])
    logged = {key for row in trainer.state.log_history for key in row if "/" in key}
    for prefix in ("norm_grad", "adanorm"):
        layers = {key.split("/")[1] for key in logged if key.startswith(prefix + "/")} - {"all"}
        assert layers == names, prefix  # by the norms' own names: no '.source' (frozen), no '.target'
    steps = [row for row in trainer.state.log_history if "norm_grad/all/grad_out_var" in row]
    # in the ramp and after it (step 1 runs at alpha 0: the new norms take no part in it yet)
    assert [row["step"] for row in steps] == [2, 3, 4, 5] and all(row["norm_grad/all/grad_out_var"] > 0 for row in steps)
    with pytest.raises(ValueError, match="no unpatched norm with a gain or bias"):  # every norm is swapped in
        train(tmp_path / "affine", token_dataset, [hf_adanorm.GradualSwapCallback("adanorm", ramp_steps=RAMP),
                                                   AffineDriftCallback(every_n_steps=1)], save_strategy="no")

"""A sequence classifier is converted with its head: its class probabilities and its encoder's output
are distilled (the ``classifier`` objective), and the saved model predicts with the head it kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import hf_adanorm
from hf_adanorm.convert import convert_model

from test_convert import _args, _random_affine, workspace  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(workspace, folder, **config):  # noqa: F811
    torch.manual_seed(1)
    model = BertForSequenceClassification(BertConfig.from_pretrained(workspace / "bert", **config))
    _random_affine(model)
    with torch.no_grad():  # confident predictions, so that the swap visibly changes them
        model.classifier.weight.mul_(30)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(workspace / "bert").save_pretrained(folder)
    return model.eval()


def test_a_classifier_keeps_its_head_and_its_predictions(workspace, tmp_path):  # noqa: F811
    teacher = _classifier(workspace, tmp_path / "clf", num_labels=3)
    args = _args(workspace, tmp_path / "out", max_steps=40, eval_every=20)
    args.model = str(tmp_path / "clf")
    result = convert_model(args)
    assert result["objective"] == "classifier"
    naive, converted = result["naive"], result["converted"]
    assert converted["kl"] < 0.5 * naive["kl"], (naive, converted)
    assert converted["agreement"] >= naive["agreement"] and converted["agreement"] > 0.8
    assert converted["embedding_cosine"] > naive["embedding_cosine"]
    # the head was trained with the encoder and saved with it: the reloaded model is the one measured
    saved = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert "classifier.weight" in saved and not torch.equal(saved["classifier.weight"], teacher.classifier.weight)
    student = hf_adanorm.from_pretrained(AutoModelForSequenceClassification, tmp_path / "out" / "model").eval()
    assert student.num_labels == 3 and torch.equal(student.classifier.weight, saved["classifier.weight"])
    tokenizer = hf_adanorm.load_tokenizer(tmp_path / "out" / "model")
    batch = tokenizer(["the film is dull", "a warm and funny story", "nothing works"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        t, s = teacher(**batch).logits, student(**batch).logits
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert kl < naive["kl"]
    assert "share of the teacher's predicted classes kept" in (tmp_path / "out" / "conversion.md").read_text()


@pytest.mark.parametrize("config", [{"num_labels": 1}, {"num_labels": 3, "problem_type": "multi_label_classification"}])
def test_a_regression_or_multi_label_head_is_refused_with_what_to_do(workspace, tmp_path, config):  # noqa: F811
    _classifier(workspace, tmp_path / "clf", **config)
    args = _args(workspace, tmp_path / "out", max_steps=2)
    args.model = str(tmp_path / "clf")
    with pytest.raises(ValueError, match="single-label classifier's class probabilities.*--model_class base"):
        convert_model(args)
    assert not (tmp_path / "out").exists()


def test_the_classifier_objective_fits_only_a_classifier(workspace, tmp_path):  # noqa: F811
    _classifier(workspace, tmp_path / "clf", num_labels=2)
    for model, objective in ((str(tmp_path / "clf"), "hidden"), (str(workspace / "bert"), "classifier")):
        args = _args(workspace, tmp_path / "out", max_steps=2, objective=objective)
        args.model = model
        with pytest.raises(ValueError, match=f"objective '{objective}' does not fit"):
            convert_model(args)
        assert not (tmp_path / "out").exists()


def test_a_classifier_with_flat_predictions_is_not_called_exact(workspace, tmp_path):  # noqa: F811
    """A nearly flat head gives a tiny KL after any swap: the encoder output must be unchanged too before
    a post-LN swap is called exact (and then saved untrained)."""
    folder = tmp_path / "flat"
    model = _classifier(workspace, folder)
    with torch.no_grad():
        model.classifier.weight.mul_(1e-3)  # 0.03 of the random head
    model.save_pretrained(folder)
    result = convert_model(_args(workspace, tmp_path / "out", model=str(folder), norm="layernorm_simple", max_steps=6))
    assert result["naive"]["kl"] < 1e-6, "the fixture should make the naive KL tiny"
    assert result["naive"]["relative_error"] > 0.01
    assert not result["exact_without_training"] and result["steps"] == 6
    assert result["converted"]["relative_error"] < result["naive"]["relative_error"]


def test_a_pre_ln_classifier_whose_fold_is_exact_is_called_exact(workspace, tmp_path):  # noqa: F811
    """The fold moves GPT-2's last gain into its score head: the last hidden state changes where the class
    probabilities stay the same, so it must not count against exactness (that trained the model worse)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from test_convert import _random_affine
    torch.manual_seed(2)
    model = GPT2ForSequenceClassification(GPT2Config.from_pretrained(workspace / "gpt2", num_labels=3))
    _random_affine(model)
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(workspace / "gpt2").save_pretrained(tmp_path / "clf")
    result = convert_model(_args(workspace, tmp_path / "out", model=str(tmp_path / "clf"), norm="layernorm_simple",
                                 dataset=str(workspace / "texts.txt"), max_steps=6))
    assert result["naive"]["relative_error"] > 0.01  # the last hidden state did change
    assert result["exact_without_training"] and result["steps"] == 0
    assert result["converted"]["agreement"] == 1.0 and abs(result["converted"]["kl"]) < 1e-6

"""The conversion distils through each target norm's exact gradient (convert/exact_grad.py), and the
conversion's options are taken as what they mean: a path is one folder however it is spelled, a
string is not a bool, an option that cannot hold is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

import hf_adanorm
from hf_adanorm.convert import ConvertArgs, convert_model
from hf_adanorm.convert.exact_grad import exact_backward
from hf_adanorm.convert.report import ARGS_FILE, RESULT_FILE
from hf_adanorm.norms import AdaNorm, DetachNorm, LayerNormSimple, RMSAdaNorm, RMSDetachNorm

from test_convert import _args, _snapshot, workspace, write_random_states  # noqa: F401 - the tiny 'pretrained' models and text

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(norm, x):
    """The norm's forward written out in float64 autograd ops, nothing detached."""
    centre = not isinstance(norm, (RMSAdaNorm, RMSDetachNorm))
    x = x.double()
    d = x - x.mean(-1, keepdim=True) if centre else x
    if norm.eps_mode == "fairseq":  # the paper's code: unbiased std, eps added to sigma
        y = d / (d.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt().add(norm.eps)
    else:
        y = d / (d.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    return norm.C * (1 - norm.k * y) * y if isinstance(norm, AdaNorm) else y


@pytest.mark.parametrize("make", [
    lambda: AdaNorm(24, k=0.1, C=2.0), lambda: AdaNorm(24, k=0.3, eps_mode="fairseq"), lambda: RMSAdaNorm(24, k=0.2),
    lambda: DetachNorm(24, detach="both"), lambda: DetachNorm(24, detach="mean"), lambda: RMSDetachNorm(24),
])
def test_inside_the_context_every_gradient_is_the_forwards_own(make):
    norm = make()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 24, generator=gen) * 4 + 1).requires_grad_(True)
    g = torch.randn(3, 5, 24, generator=gen)
    x64 = x.detach().double().requires_grad_(True)
    want = _reference(norm, x64)
    (want_grad,) = torch.autograd.grad(want, x64, g.double())
    detached_out = norm(x)
    (detached_grad,) = torch.autograd.grad(detached_out, x, g)
    with exact_backward(norm) as changed:
        assert changed == 1
        out = norm(x)
        (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-4)
    # outside it the norm is the paper's again: the same forward, the detached gradient
    assert "forward" not in vars(norm)
    torch.testing.assert_close(norm(x), detached_out, rtol=0, atol=0)
    assert (detached_grad.double() - want_grad).abs().max() > 1e-2  # so the check above can fail


def test_the_model_is_unchanged_hooks_fire_and_disabled_changes_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), AdaNorm(8), torch.nn.Linear(8, 8), LayerNormSimple(8),
                                DetachNorm(8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(o))
    with exact_backward(model, enabled=False) as changed:
        assert changed == 0 and not any("forward" in vars(m) for m in model)
    with exact_backward(model) as changed:
        assert changed == 2  # AdaNorm and DetachNorm; LayerNorm-simple's backward is already exact
        model(torch.randn(2, 8))
    assert len(seen) == 1 and model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="boom"), exact_backward(model):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model)  # restored after an error too


def test_the_conversion_distils_through_the_exact_gradient_and_saves_the_papers_norm(workspace, tmp_path,
                                                                                      monkeypatch):  # noqa: F811
    from hf_adanorm.convert import loop
    used = []
    real = loop.exact_backward

    def spy(model, enabled=True):
        used.append(enabled)
        return real(model, enabled)

    monkeypatch.setattr(loop, "exact_backward", spy)
    exact = convert_model(_args(workspace, tmp_path / "exact", max_steps=6, eval_every=3))
    assert used == [True] * 6  # every step's loss and backward
    detached = convert_model(_args(workspace, tmp_path / "detached", max_steps=6, eval_every=3, exact_backward=False))
    assert used == [True] * 6 + [False] * 6
    assert exact["history"][0]["loss"] == pytest.approx(detached["history"][0]["loss"], rel=1e-4)  # same forward
    assert exact["history"][-1]["loss"] != detached["history"][-1]["loss"]  # other gradients, other steps
    model = hf_adanorm.from_pretrained(AutoModel, tmp_path / "exact" / "model")
    norms = [m for m in model.modules() if isinstance(m, AdaNorm)]
    assert norms and not any("forward" in vars(m) for m in norms)  # the saved model is the paper's AdaNorm
    assert json.loads((tmp_path / "exact" / ARGS_FILE).read_text())["exact_backward"] is True


def test_a_resume_of_a_run_from_before_exact_backward_keeps_the_detached_gradient(workspace, tmp_path):  # noqa: F811
    from hf_adanorm.convert.inputs import check_output_dir as _check_output_dir
    from hf_adanorm.training.checkpoints import STATE_FILE
    out = tmp_path / "out"
    out.mkdir()
    saved = _args(workspace, out, max_steps=12, checkpointing_steps=5).to_dict()
    del saved["exact_backward"]
    (out / ARGS_FILE).write_text(json.dumps(saved))
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / STATE_FILE).write_text("{}")
    write_random_states(out / "checkpoints" / "step_5")
    with pytest.raises(ValueError, match="exact_backward: False -> True"):
        _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=5))
    step = out / "checkpoints" / "step_5"
    assert _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=5, exact_backward=False)) == step
    # checkpointing_steps does not change the result: a resume may change it
    assert _check_output_dir(_args(workspace, out, max_steps=12, checkpointing_steps=3, exact_backward=False)) == step


def test_a_local_path_is_one_folder_however_it_is_written(workspace, tmp_path, monkeypatch):  # noqa: F811
    from hf_adanorm.convert.inputs import check_output_dir as _check_output_dir
    from hf_adanorm.training.checkpoints import STATE_FILE
    monkeypatch.chdir(workspace)
    spellings = ["bert", "./bert/", str(workspace / "bert")]
    assert {ConvertArgs(model=m, dataset="texts.txt", output_dir="o").model for m in spellings} == {
        str(workspace / "bert")}
    assert ConvertArgs(model="org/hub-id", dataset="texts.txt", output_dir="o").model == "org/hub-id"
    # an interrupted run recorded as 'bert' resumes from './bert/'; from another folder 'bert' is another model
    out = tmp_path / "out"
    out.mkdir()
    saved = _args(workspace, out, checkpointing_steps=5).to_dict()
    saved["model"] = "bert"
    (out / ARGS_FILE).write_text(json.dumps(saved))
    (out / "checkpoints" / "step_5").mkdir(parents=True)
    (out / "checkpoints" / "step_5" / STATE_FILE).write_text("{}")
    write_random_states(out / "checkpoints" / "step_5")
    spelled = lambda model: ConvertArgs(**dict(_args(workspace, out, checkpointing_steps=5).to_dict(), model=model))
    assert _check_output_dir(spelled("./bert/")) == out / "checkpoints" / "step_5"
    # runs now record the absolute folder: 'bert' from another working folder is another model
    saved["model"] = str(workspace / "bert")
    (out / ARGS_FILE).write_text(json.dumps(saved))
    other = tmp_path / "elsewhere"
    (other / "bert").mkdir(parents=True)
    monkeypatch.chdir(other)
    with pytest.raises(ValueError, match="model: .*-> .*elsewhere/bert"):
        _check_output_dir(spelled("bert"))


@pytest.mark.parametrize("option, value", [("rescale_post_ln", "no"), ("exact_backward", "false"), ("cpu", "no"),
                                           ("overwrite_output_dir", 1), ("split_seed", "1"), ("split_seed", -1)])
def test_a_string_is_not_a_bool_nor_a_seed(option, value, tmp_path):
    with pytest.raises(ValueError, match=option):
        ConvertArgs(model="m", dataset="d", output_dir=str(tmp_path / "out"), **{option: value})


@pytest.mark.parametrize("case", ["overwrite and resume", "resume into a new folder", "causal max_length 1",
                                  "max_length over the positions", "text shorter than a block"])
def test_options_that_cannot_hold_are_refused_before_anything_is_written(workspace, tmp_path, case):  # noqa: F811
    out = tmp_path / "out"
    checkpoint = str(tmp_path / "other" / "checkpoints" / "step_4")
    if case == "overwrite and resume":
        with pytest.raises(ValueError, match="cannot resume from"):
            _args(workspace, out, overwrite_output_dir=True, resume_from_checkpoint=checkpoint)
        return
    options, error, match = {}, ValueError, None
    if case == "resume into a new folder":
        options, error, match = {"resume_from_checkpoint": checkpoint}, FileNotFoundError, "holds no conversion to resume"
    elif case == "causal max_length 1":
        options, match = {"model": "gpt2", "max_length": 1}, "too short for a causal LM"
    elif case == "max_length over the positions":
        options, match = {"max_length": 65}, "more than the 64 positions"
    else:
        for split in ("train", "validation"):
            (tmp_path / "short" / f"{split}.txt").parent.mkdir(exist_ok=True)
            (tmp_path / "short" / f"{split}.txt").write_text("the film")
        options, match = {"model": "gpt2", "dataset": str(tmp_path / "short")}, "fewer than max_length=32 tokens"
    with pytest.raises(error, match=match):
        convert_model(_args(workspace, out, **options))
    assert not out.exists() and _snapshot(out) is None


@pytest.mark.parametrize("max_length, fits", [(33, False), (32, True)])
def test_a_length_past_the_model_s_own_positions_is_refused_before_anything_is_written(workspace, tmp_path,  # noqa: F811
                                                                                      max_length, fits):
    """RoBERTa counts its positions past a padding offset: its config's max_position_embeddings (here 33,
    so the config alone lets 33 through) holds max_position_embeddings - pad_token_id - 1 tokens."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(workspace / "bert")
    assert tokenizer.pad_token_id == 0  # the fixture's; then RoBERTa's first position is 1
    roberta = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=33,
                                         pad_token_id=0))
    roberta.save_pretrained(tmp_path / "roberta")
    tokenizer.save_pretrained(tmp_path / "roberta")
    out = tmp_path / "out"
    args = _args(workspace, out, model=str(tmp_path / "roberta"), dataset=str(workspace / "texts.txt"),
                 max_length=max_length, max_steps=2, eval_every=2, max_eval_samples=4)
    if fits:
        assert convert_model(args)["steps"] == 2
        return
    with pytest.raises(ValueError, match="cannot take a sequence of max_length=33 tokens.*smaller --max_length"):
        convert_model(args)
    assert not out.exists() and _snapshot(out) is None

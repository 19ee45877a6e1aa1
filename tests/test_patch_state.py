"""Patch state that follows the model: dtype and device moves, copies, pickling, shared configs."""

from __future__ import annotations

import copy
import io
import multiprocessing
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_adanorm
from hf_adanorm.checkpoint import PatchedSavePretrained, from_pretrained, save_pretrained
from test_fold import logits, tiny_lm


def assert_same_model(a, b) -> None:
    """Same module types at the same names, same state dict bitwise, same parameter flags."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, key
        assert sa[key].shape == sb[key].shape, key
        if not sa[key].is_meta:
            assert torch.equal(sa[key], sb[key]), key
    flags = [(n, p.requires_grad) for n, p in a.named_parameters(remove_duplicate=False)]
    assert flags == [(n, p.requires_grad) for n, p in b.named_parameters(remove_duplicate=False)]
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


MOVES = {
    "float64": lambda m: m.to(torch.float64),
    "half": lambda m: m.half(),
    "bfloat16 then float32 (lossy round trip)": lambda m: m.to(torch.bfloat16).float(),
    "meta device": lambda m: m.to("meta"),
}


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_unpatch_after_a_move_equals_the_unpatched_model_moved_the_same_way(model_type, move):
    reference = tiny_lm(model_type)
    model = copy.deepcopy(reference)
    hf_adanorm.patch_model(model, "adanorm", include_rmsnorm=True)
    MOVES[move](model)
    MOVES[move](reference)
    hf_adanorm.unpatch_model(model)
    assert_same_model(model, reference)
    if move != "meta device":
        assert torch.equal(logits(model), logits(reference))  # no "mixed dtype" error, same output


@pytest.mark.parametrize("move", ["float64", "half", "meta device"])
def test_exact_unfold_after_a_move_is_bitwise(move):
    reference = tiny_lm("gpt2")
    model = copy.deepcopy(reference)
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    assert hf_adanorm.get_patch_record(model)["fold"]["folded"]
    MOVES[move](model)
    MOVES[move](reference)
    hf_adanorm.unpatch_model(model)
    assert_same_model(model, reference)
    if move != "meta device":  # (torch's own move to meta unties weights)
        assert model.lm_head.weight is model.get_input_embeddings().weight  # tied again
        assert torch.equal(logits(model), logits(reference))


def test_exact_unfold_refuses_after_a_lossy_dtype_round_trip():
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    model.half().float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"converted through a lower precision"):
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("changed", ["lm_head", "embeddings"])
def test_exact_unfold_sees_a_change_to_a_tied_layer_after_a_narrowing_move(dtype, changed):
    # The folded LM head's original is the embedding, which moved with the model: the fold's inputs
    # are lost, and the bias (unchanged here) must not be the only witness. A change to the head alone
    # would be discarded; one to the embeddings (trained while patched) tied back into the head.
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    model.to(dtype)
    with torch.no_grad():  # one step of one element, as small a change as the dtype has
        w = model.lm_head.weight if changed == "lm_head" else model.get_input_embeddings().weight
        w[3, 0] = torch.nextafter(w[3, 0], torch.tensor(float("inf"), dtype=dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"lm_head absorbed .* changed since .* discard"):
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model) and model.lm_head.weight is not model.get_input_embeddings().weight
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_exact_unfold_refuses_a_move_it_cannot_check_and_says_what_to_do():
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    model.to(torch.float8_e4m3fn)  # a dtype no fingerprint was taken for
    with pytest.raises(RuntimeError, match=r"lm_head was folded from .* no fingerprint .* Unpatch before"):
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model)


def test_fold_keeps_no_copy_by_default_and_unpatch_says_what_to_do():
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.record.get_state(model).fold
    assert fold.layers and all(f.original_weight is None and f.original_bias is None
                               for f in fold.layers.values())
    with pytest.raises(RuntimeError, match=r"kept no copy .* exact_unfold=True"):
        hf_adanorm.unpatch_model(model)
    assert hf_adanorm.is_patched(model)


def test_exact_unfold_is_refused_without_fold_affine():
    with pytest.raises(ValueError, match=r"exact_unfold=True only applies with fold_affine=True"):
        hf_adanorm.patch_model(tiny_lm("gpt2"), "layernorm_simple", exact_unfold=True)


def test_patch_state_is_invisible_to_parameters_state_dict_and_sequential():
    model = tiny_lm("gpt2")
    params, keys = len(list(model.parameters())), set(model.state_dict())
    hf_adanorm.patch_model(model, "adanorm")
    assert len(list(model.parameters())) == params - 2 * 5  # 5 norms lost gain and bias, nothing added
    assert set(model.state_dict()) == {k for k in keys if ".ln_" not in k}
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    hf_adanorm.patch_model(net, "layernorm_simple")
    assert len(net) == 2 and net(torch.randn(2, 4)).shape == (2, 4)


# ------------------------------------------------------------------ round trips (issue 13, item 5)

def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "deepcopy": copy.deepcopy, "torch.save": _torch_save}


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_patched_model_round_trips_and_still_unpatches(trip, tmp_path):
    reference = tiny_lm("gpt2")
    model = copy.deepcopy(reference)
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    copied = ROUND_TRIPS[trip](model)
    assert hf_adanorm.get_patch_record(copied) == hf_adanorm.get_patch_record(model)
    assert torch.equal(logits(copied), logits(model))
    hook = vars(copied)["save_pretrained"]
    assert isinstance(hook, PatchedSavePretrained) and hook.model is copied  # follows the copy
    copied.save_pretrained(tmp_path / "saved")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "saved")
    assert torch.equal(logits(loaded), logits(model))
    hf_adanorm.unpatch_model(copied)
    assert_same_model(copied, reference)
    assert hf_adanorm.is_patched(model)  # the original is untouched


@pytest.mark.slow
@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_loaded_model_round_trips(trip, tmp_path):
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    save_pretrained(model, tmp_path / "first")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "first")
    copied = ROUND_TRIPS[trip](loaded)
    assert torch.equal(logits(copied), logits(model))
    copied.save_pretrained(tmp_path / "second")
    again = from_pretrained(AutoModelForCausalLM, tmp_path / "second")
    assert torch.equal(logits(again), logits(model))


@pytest.mark.slow
def test_a_spawned_worker_receives_a_patched_and_a_loaded_model(tmp_path):
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    save_pretrained(model, tmp_path / "saved")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "saved")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)  # outputs that pickle back (no autograd graph)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # pickles the models to the worker
        records = pool.map(hf_adanorm.get_patch_record, [model, loaded])
        outputs = pool.starmap(torch.nn.Module.__call__, [(model.eval(), ids)])
    assert records == [hf_adanorm.get_patch_record(model)] * 2
    with torch.no_grad():
        assert torch.equal(outputs[0].logits, model(ids).logits)


# ------------------------------------------------------------------ shared configs (issue 13, item 6)

def test_a_shared_config_never_receives_the_patch(tmp_path):
    config = GPT2Config(vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    before = config.to_dict()
    baseline, patched = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    hf_adanorm.patch_model(patched, "layernorm_simple", fold_affine=True, exact_unfold=True)
    assert config.to_dict() == before and baseline.config is config
    assert patched.config.tie_word_embeddings is False  # the untied head lives in its own copy
    hf_adanorm.patch_model(baseline, "adanorm")  # the second model can be patched too
    hf_adanorm.unpatch_model(baseline)
    baseline.save_pretrained(tmp_path / "baseline")  # (transformers itself adds dtype, architectures)
    assert "hf_adanorm" not in (tmp_path / "baseline" / "config.json").read_text()
    hf_adanorm.unpatch_model(patched)
    assert patched.config is config and patched.transformer.config is config
    assert config.tie_word_embeddings is True and not hasattr(config, "hf_adanorm")

"""patch_model / unpatch_model refusals: each error is precise and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from test_patch import tiny_bert
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import hf_adanorm
from hf_adanorm import (AdaNorm, DetachNorm, LayerNormSimple, get_patch_record, is_patched, patch_model,
                        unpatch_model)



@pytest.mark.parametrize("norm,options,error,message", [
    ("ada_norm", {}, ValueError,
     r"unknown norm 'ada_norm'; choose one of \['adanorm', 'detachnorm', 'layernorm_simple', 'no_norm'"),
    ("adanorm", {"k": 0}, ValueError, r"k > 0.*got k=0"),
    ("adanorm", {"k": -0.1}, ValueError, r"k > 0.*got k=-0.1"),
    ("adanorm", {"C": 0.0}, ValueError, r"C > 0.*got C=0.0"),
    ("adanorm", {"C": -1}, ValueError, r"C > 0.*got C=-1"),
    ("adanorm", {"kk": 0.1}, TypeError, r"unknown patch_model option\(s\) \['kk'\]; valid: .*'k'"),
    ("detachnorm", {"detach": "gain"}, ValueError, r"detach must be one of"),
    ("adanorm", {"eps_mode": "tf"}, ValueError, r"eps_mode must be 'torch' .* or 'fairseq'"),
    ("adanorm", {"eps": 0.0}, ValueError, r"eps must be a finite number > 0"),
    ("adanorm", {"include": "encoder.(layer"}, ValueError,
     r"include='encoder.\(layer' is not a valid regular expression"),
    ("adanorm", {"exclude": 3}, TypeError, r"exclude must be a regex string or a list"),
    ("adanorm", {"include": {"LayerNorm"}}, TypeError, r"include must be a regex string or a list"),
    ("adanorm", {"include": "no_such_module"}, ValueError,
     r"no module matched: found embeddings.LayerNorm, .* \(layernorm: not matched by include\)\.$"),
    ("adanorm", {"filter_fn": "embeddings"}, TypeError, r"filter_fn must be a callable"),
    # an exclude that keeps nothing: a search pattern where a full-name regex is expected, or a misspelt name
    ("adanorm", {"exclude": "embeddings"}, ValueError,
     r"exclude='embeddings': 'embeddings' matched no norm, so it would keep none; patterns are a regular "
     r"expression that must match a module's full name .* The norms are named: embeddings.LayerNorm, "),
    ("adanorm", {"exclude": ["embedding.LayerNorm"]}, ValueError,
     r"exclude=\['embedding.LayerNorm'\]: 'embedding.LayerNorm' matched no norm.*module names, or their last"),
    ("adanorm", {"exclude": ["embeddings.LayerNorm", "attention.outptu.LayerNorm"]}, ValueError,
     r"'attention.outptu.LayerNorm' matched no norm"),  # one typo among several
])
def test_bad_options_raise_and_change_nothing(norm, options, error, message, state_of, assert_unchanged):
    model = tiny_bert()
    before = state_of(model)
    with pytest.raises(error, match=message):
        patch_model(model, norm, **options)
    assert_unchanged(model, before)


def test_error_from_filter_fn_changes_nothing(state_of, assert_unchanged):
    model = tiny_bert()
    before = state_of(model)

    def picky(module, name):
        if name.endswith("output.LayerNorm"):
            raise KeyError(name)
        return True

    with pytest.raises(KeyError):
        patch_model(model, "adanorm", filter_fn=picky)
    assert_unchanged(model, before)


@pytest.mark.parametrize("model,message", [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), r"^found no LayerNorm-like module in the model; nothing"),
    (nn.Sequential(nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8)),
     r"found no LayerNorm-like module.*1 \[BatchNorm1d: BatchNorm1d does not normalize over the last"),
    (nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), LlamaRMSNorm(8)),
     r"no module matched: found 1, 2 \(rmsnorm: RMSNorm \(pass include_rmsnorm=True.*\)\)\. This model uses RMSNorm: "
     r"pass include_rmsnorm=True\.$"),
])
def test_nothing_to_patch_is_a_precise_error(model, message, state_of, assert_unchanged):
    before = state_of(model)
    with pytest.raises(ValueError, match=message):
        patch_model(model, "adanorm")
    assert_unchanged(model, before)


@pytest.mark.parametrize("not_a_module", ["bert-base-uncased", None, {"ln": nn.LayerNorm(4)}])
def test_non_module_is_rejected(not_a_module):
    with pytest.raises(TypeError, match=r"patch_model needs a torch.nn.Module, got "):
        patch_model(not_a_module, "adanorm")


def test_patching_twice_raises_and_keeps_the_first_patch(state_of, assert_unchanged):
    model = tiny_bert()
    patch_model(model, "adanorm")
    before, record = state_of(model), dict(get_patch_record(model))
    with pytest.raises(RuntimeError, match=r"already patched with 'adanorm'; call hf_adanorm.unpatch_model"):
        patch_model(model, "layernorm_simple")
    assert_unchanged(model, before)
    assert get_patch_record(model) == record and not hasattr(model.config, "hf_adanorm")


def test_a_patched_part_is_never_patched_again():
    """Patching a submodule of a patched model (or the reverse) must not stack norms."""
    model = tiny_bert()
    patch_model(model, "layernorm_simple")
    with pytest.raises(ValueError, match=r"no module matched: found .*already an hf_adanorm norm"):
        patch_model(model.encoder, "adanorm")
    assert all(type(m) is not AdaNorm for m in model.modules())

    # The reverse would leave two records for one shared config: refused, nothing changed.
    model = tiny_bert()
    patch_model(model.encoder, "layernorm_simple")
    record = dict(get_patch_record(model.encoder))
    report = patch_model(model, "adanorm", dry_run=True)  # a dry run still says what it sees
    assert [e.name for e in report.replaced] == ["embeddings.LayerNorm"]
    assert "already an hf_adanorm norm (this model or a part of it was patched before)" in {
        e.reason for e in report.skipped}
    with pytest.raises(RuntimeError, match=r"part of this model is already patched \(encoder, "):
        patch_model(model, "adanorm")
    assert type(model.embeddings.LayerNorm) is torch.nn.LayerNorm
    assert get_patch_record(model.encoder) == record and not is_patched(model)


def test_a_config_with_a_foreign_record_is_refused():
    """A stock model carrying a record in its config (e.g. loaded without the plugin)."""
    model = tiny_bert()
    model.config.hf_adanorm = {"format_version": 1, "config": {"norm": "adanorm"}, "modules": {}}
    with pytest.raises(RuntimeError, match="carries an hf_adanorm record but this model is not patched"):
        patch_model(model, "adanorm")
    assert type(model.embeddings.LayerNorm) is torch.nn.LayerNorm and not is_patched(model)


def test_input_of_the_wrong_size_is_refused():
    with pytest.raises(RuntimeError, match=r"expects inputs ending in \[8\], got shape \[2, 5\]"):
        LayerNormSimple(8)(torch.randn(2, 5))


def test_unpatch_errors_and_repatch():
    model = tiny_bert()
    with pytest.raises(ValueError, match="not patched by hf_adanorm"):
        unpatch_model(model)
    patch_model(model, "adanorm")
    unpatch_model(model)
    with pytest.raises(ValueError, match="not patched by hf_adanorm"):
        unpatch_model(model)
    report = patch_model(model, "detachnorm", detach="variance", eps=1e-6)  # a fresh patch works
    new = model.embeddings.LayerNorm
    assert len(report.replaced) == 5 and type(new) is DetachNorm and new.detach == "variance"
    assert new.eps == 1e-6 and get_patch_record(model)["config"]["eps"] == 1e-6


def test_public_names():
    assert hf_adanorm.available_norms() == ["adanorm", "detachnorm", "layernorm_simple", "no_norm"]


def test_include_tuple_is_recorded_as_a_json_stable_list():
    model = tiny_bert()
    patch_model(model, "adanorm", include=("embeddings.LayerNorm",))
    record = get_patch_record(model)
    assert record["config"]["include"] == ["embeddings.LayerNorm"]
    assert json.loads(json.dumps(record)) == record
    assert hf_adanorm.NormConfig(**record["config"]).to_dict() == record["config"]

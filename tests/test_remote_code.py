"""The generated modeling_hf_adanorm.py: same math as the library on awkward inputs, same record checks."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import hf_adanorm
from hf_adanorm import NormConfig
from hf_adanorm.checkpoint import CheckpointError, from_pretrained, save_pretrained
from hf_adanorm.registry import build_norm
from hf_adanorm.remote_code import MODELING_FILE, modeling_source
from test_fold import tiny_lm


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The generated file of a GPT-2 checkpoint, imported as a module (it needs only torch and transformers)."""
    path = tmp_path_factory.mktemp("generated") / MODELING_FILE
    path.write_text(modeling_source(GPT2LMHeadModel))
    spec = importlib.util.spec_from_file_location("generated_hf_adanorm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass configs look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def awkward_rows(d: int, dtype=torch.float64) -> torch.Tensor:
    """Rows a random test never draws: constant (padding), zero, huge offset, tiny spread, one spike."""
    gen = torch.Generator().manual_seed(d)
    rows = [torch.zeros(d), torch.full((d,), 3.5), torch.full((d,), -1e4),
            1e4 + torch.randn(d, generator=gen) * 1e-2, torch.randn(d, generator=gen) * 1e-6,
            torch.randn(d, generator=gen) * 30 + 7, torch.zeros(d).index_fill_(0, torch.tensor([0]), 50.0)]
    return torch.stack(rows).to(dtype)


CASES = [  # (norm, kind, options)
    ("adanorm", "layernorm", {}), ("adanorm", "layernorm", {"eps_mode": "fairseq"}),
    ("adanorm", "rmsnorm", {"k": 0.3, "C": 2.0}), ("adanorm", "rmsnorm", {"eps_mode": "fairseq"}),
    ("layernorm_simple", "layernorm", {}), ("layernorm_simple", "layernorm", {"eps_mode": "fairseq"}),
    ("layernorm_simple", "rmsnorm", {"eps_mode": "fairseq"}),
    ("detachnorm", "layernorm", {"detach": "mean"}), ("detachnorm", "layernorm", {"detach": "variance"}),
    ("detachnorm", "layernorm", {"detach": "both", "eps_mode": "fairseq"}),
    ("detachnorm", "rmsnorm", {"detach": "variance", "eps_mode": "fairseq"}),
    ("no_norm", "layernorm", {}),
]


@pytest.mark.parametrize("norm,kind,extra", CASES, ids=[f"{n}-{k}-{'-'.join(map(str, e.values())) or 'default'}"
                                                         for n, k, e in CASES])
@pytest.mark.parametrize("d,dtype", [(24, torch.float64), (1, torch.float64), (2, torch.float64),
                                     (16, torch.float32), (16, torch.bfloat16)])
def test_generated_norm_computes_what_the_library_computes(generated, norm, kind, extra, d, dtype):
    """Forward and input gradient, against the library on the same rows. In float64 they agree to
    round-off; in lower precision a row such as 1e4 + 1e-2 noise is ill-conditioned (its float32
    centring loses most digits), so there each must be as close to the float64 result as the library is."""
    options = {**NormConfig(norm=norm, **extra).to_dict()}
    ours = build_norm(NormConfig(**options), kind, (d,), 1e-5)
    theirs = generated.HFAdaNorm(d, 1e-5, kind == "layernorm", options)
    x = torch.cat([awkward_rows(d), torch.randn(5, d, dtype=torch.float64) * 2 + 1]).to(dtype)
    x = x.reshape(3, 4, d)  # a batch of sequences, padding rows included
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)

    def run(module, inputs, grads):
        leaf = inputs.clone().requires_grad_()
        out = module(leaf)
        (out.double() * grads.double()).sum().backward()
        return out, leaf.grad

    z_ours, dx_ours = run(ours, x, g)
    z_theirs, dx_theirs = run(theirs, x, g)
    assert z_theirs.dtype == z_ours.dtype == dtype and dx_theirs.dtype == dtype
    assert torch.isfinite(z_theirs).all() and torch.isfinite(dx_theirs).all(), "NaN/inf (constant rows?)"
    if dtype == torch.float64:
        torch.testing.assert_close(z_theirs, z_ours, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dx_theirs, dx_ours, rtol=1e-9, atol=1e-9 * max(1.0, dx_ours.abs().max().item()))
        return
    z_exact, dx_exact = run(ours, x.double(), g.double())  # the library in float64 on the same rows
    # the error any float implementation has on a row: its precision times the row's conditioning
    # |x| / sigma (1e4 + 1e-2 noise: 1e6, where float32 centring keeps about one digit)
    x64 = x.double()
    conditioning = x64.abs().amax(-1) / (x64.var(-1, unbiased=False) + 1e-5).sqrt()
    allowed = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype] + 8 * torch.finfo(dtype).eps * conditioning
    for got, lib, exact in ((z_theirs, z_ours, z_exact), (dx_theirs, dx_ours, dx_exact)):
        scale = exact.abs().amax(-1).clamp_min(1.0)
        for name, value in (("generated", got), ("library", lib)):  # both, so the bound means something
            error = (value.double() - exact).abs().amax(-1) / scale
            assert (error <= allowed).all(), (name, error, allowed)


def test_constant_rows_in_fairseq_mode_have_finite_gradients(generated):
    options = NormConfig(norm="adanorm", eps_mode="fairseq").to_dict()
    norm = generated.HFAdaNorm(8, 1e-5, True, options)
    x = torch.full((2, 8), 4.0, requires_grad=True)
    norm(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    expected = torch.ones(2, 8) / 1e-5  # sigma = eps on a constant row: dx = (g - mean(g)) / eps
    torch.testing.assert_close(x.grad, expected - expected.mean(-1, keepdim=True))


@pytest.mark.parametrize("value", [0.1, 3.7, 1000.3])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_a_constant_row_in_fairseq_mode_is_zero_in_the_remote_code_too(generated, value, eps):
    """hf_adanorm's own paths take the mean's float32 rounding error out before fairseq's sigma = sqrt(v) + eps;
    the remote code's copy did not, so a constant row came out of order 1 (0.98) through trust_remote_code
    and 0 through hf_adanorm.from_pretrained."""
    norm = generated.HFAdaNorm(768, eps, True, NormConfig(norm="layernorm_simple", eps_mode="fairseq").to_dict())
    x = torch.full((2, 768), value, requires_grad=True)
    g = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    z = norm(x)
    z.backward(g)
    assert z.abs().max() < 1e-6
    exact = (g - g.mean(-1, keepdim=True)) / eps
    assert ((x.grad - exact).abs().max() / exact.abs().max()) < 1e-5


# ---------------------------------------------------------------- the record, checked by both readers

def _set_module(name, **fields):
    def edit(record):
        record["modules"][name] = {**record["modules"].get(name, {"kind": "layernorm", "size": 32, "eps": 1e-5}),
                                   **fields}
    return edit


BAD_RECORDS = {  # id: (edit of the record, what the error must say)
    "eps_negative": (_set_module("transformer.h.0.ln_1", eps=-1.0), r"\.eps"),
    "eps_nan": (_set_module("transformer.h.0.ln_1", eps=math.nan), r"\.eps"),
    "eps_zero": (_set_module("transformer.h.0.ln_1", eps=0), r"\.eps is 0 .* eps > 0"),  # config.eps is null
    "k_negative": (lambda r: r["config"].update(k=-1.0), r"config\.k|k=-1"),
    "C_infinite": (lambda r: r["config"].update(C=math.inf), r"config\.C|C=inf"),
    "eps_mode": (lambda r: r["config"].update(eps_mode="paper"), r"eps_mode"),
    "kind_batchnorm": (_set_module("transformer.h.0.ln_1", kind="batchnorm"), r"\.kind"),
    "kind_rmsnorm_at_a_layernorm": (_set_module("transformer.h.0.ln_1", kind="rmsnorm"),
                                    r"says a rmsnorm of size 32, but .* has a layernorm"),
    "size_999": (_set_module("transformer.h.0.ln_1", size=999), r"size 999"),
    "size_zero": (_set_module("transformer.h.0.ln_1", size=0), r"\.size"),
    "empty_name": (_set_module("", kind="layernorm", size=32, eps=1e-5), r"not a module path"),
    "missing_module": (_set_module("transformer.h.9.ln_1"), r"does not have"),
    "a_linear_layer": (_set_module("lm_head"), r"not a norm"),
    "not_a_record": (lambda r: r.clear(), r"format_version"),
    "newer_format": (lambda r: r.update(format_version=99), r"newer hf_adanorm"),
    "unknown_norm": (lambda r: r["config"].update(norm="batchnorm"), r"'batchnorm'"),
    "no_modules": (lambda r: r.update(modules={}), r"modules"),
    "fold_names_a_norm": (lambda r: r.update(fold={"added_bias": ["transformer.ln_f"]}), r"not an nn.Linear"),
}


@pytest.fixture(scope="module")
def saved_record(tmp_path_factory):
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    return copy.deepcopy(hf_adanorm.get_patch_record(model))


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_the_generated_file_refuses_a_bad_record_naming_the_field(generated, saved_record, case):
    edit, message = BAD_RECORDS[case]
    record = copy.deepcopy(saved_record)
    edit(record)
    model = tiny_lm("gpt2")
    before = [type(m) for m in model.modules()]
    with pytest.raises(generated.CheckpointError, match=message):
        generated.apply_patch(model, record, "GPT2LMHeadModel")
    assert [type(m) for m in model.modules()] == before  # nothing was swapped


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_the_library_refuses_a_bad_record_naming_the_field(tmp_path, saved_record, case):
    edit, message = BAD_RECORDS[case]
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["hf_adanorm"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(AutoModelForCausalLM, tmp_path)


def test_a_module_eps_of_0_is_accepted_where_config_eps_replaces_it(generated, saved_record):
    record = copy.deepcopy(saved_record)  # as patch_model(..., eps=1e-5) records a LayerNorm of eps 0
    record["config"]["eps"] = 1e-5
    record["modules"]["transformer.h.0.ln_1"]["eps"] = 0
    hf_adanorm.record.check_record(record)
    model = tiny_lm("gpt2")
    generated.apply_patch(model, record, "GPT2LMHeadModel")
    assert model.transformer.h[0].ln_1.eps == 1e-5


def test_transformers_remote_loading_raises_the_generated_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["hf_adanorm"]["modules"]["transformer.h.0.ln_2"]["eps"] = -1.0
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"modules\['transformer.h.0.ln_2'\]\.eps is -1.0") as caught:
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert type(caught.value).__name__ == "CheckpointError"


def test_a_model_loaded_through_the_remote_code_saves_a_guarded_checkpoint_again(tmp_path, monkeypatch):
    """transformers' own save_pretrained of a trust_remote_code model (a fine-tune without hf_adanorm)
    keeps the record, the guard and the remote code: stock classes still refuse the new folder."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm", fold_affine=True)
    save_pretrained(model, tmp_path / "a")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    remote.save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "hf_adanorm_gpt2" and config["hf_adanorm"] == hf_adanorm.get_patch_record(model)
    assert (tmp_path / "b" / MODELING_FILE).read_text() == (tmp_path / "a" / MODELING_FILE).read_text()
    with pytest.raises(Exception, match="not a stock transformers checkpoint"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "b")
    again = from_pretrained(AutoModelForCausalLM, tmp_path / "b").eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        torch.testing.assert_close(remote(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["GPT2Config", "BertConfig", "LlamaConfig", "T5Config", "CLIPConfig", "Gemma3Config"])
def test_the_guard_is_refused_by_the_stock_config_class_and_undone_exactly(generated, name):
    import transformers
    from hf_adanorm.remote_code import guarded_field
    config_class = getattr(transformers, name)
    data = config_class().to_dict()
    field = guarded_field(config_class)
    assert field is not None and len(field) == (2 if name in ("CLIPConfig", "Gemma3Config") else 1)
    guarded = generated.guard_config_dict(data, config_class.model_type, field)
    assert data == config_class().to_dict()  # the caller's dict (nested ones included) untouched
    with pytest.raises(Exception, match="not a stock transformers checkpoint"):
        config_class.from_dict(guarded)
    assert generated.unguard_config_dict(guarded) == data
    assert config_class.from_dict(generated.unguard_config_dict(guarded)).to_dict() == data


@pytest.mark.parametrize("model_type,auto_class", [("vit", "AutoModel"), ("gpt_neox", "AutoModelForCausalLM")])
def test_remote_code_loads_the_weights_transformers_renames(tmp_path, monkeypatch, model_type, auto_class):
    """transformers 5 saves these under legacy key names and renames them back when loading, by
    model_type, a conversion it skips for custom code: the remote classes must still get every weight
    (before, they got fresh random ones, with a warning only)."""
    import transformers
    from arch_zoo import ARCHS, make_inputs, run
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    arch = next(a for a in ARCHS if a.id == model_type)
    auto = getattr(transformers, auto_class)
    torch.manual_seed(0)
    model = auto.from_config(transformers.AutoConfig.for_model(model_type, **arch.config)).eval()
    hf_adanorm.patch_model(model, "adanorm")
    inputs = make_inputs(arch, model)
    save_pretrained(model, tmp_path / "ckpt")
    loaded, info = auto.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded).__name__ == type(model).__name__
    for got, expected in zip(run(loaded.eval(), inputs), run(model, inputs), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_id,auto_class,saved_class", [
    ("deit", "AutoModelForImageClassification", "DeiTForImageClassificationWithTeacher"),
    ("deit", "AutoModel", "DeiTModel"),
    ("funnel", "AutoModel", "FunnelBaseModel"),
])
@pytest.mark.slow
def test_an_auto_class_that_builds_several_classes_loads_the_saved_one(tmp_path, monkeypatch, arch_id, auto_class,
                                                                       saved_class):
    """transformers' Auto mapping can give a tuple of classes (chosen by config.architectures): saving
    raised an AttributeError on it; both readers must build the saved class, with its outputs."""
    import transformers
    from arch_zoo import ARCHS, make_inputs, run
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    arch = next(a for a in ARCHS if a.id == arch_id)
    auto, cls = getattr(transformers, auto_class), getattr(transformers, saved_class)
    mappings = [transformers.AutoModel._model_mapping, transformers.AutoModelForImageClassification._model_mapping]
    assert any(cls.config_class in m and isinstance(m[cls.config_class], tuple) for m in mappings)  # the case
    torch.manual_seed(0)
    model = cls(transformers.AutoConfig.for_model(arch.model_type, **arch.config)).eval()
    hf_adanorm.patch_model(model, "adanorm")
    inputs = make_inputs(arch, model)
    save_pretrained(model, tmp_path / "ckpt")
    for loaded in (from_pretrained(auto, tmp_path / "ckpt"),
                   auto.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)):
        assert type(loaded).__name__ == saved_class
        for got, expected in zip(run(loaded.eval(), inputs), run(model, inputs), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_remote_load_as_another_class_saves_a_checkpoint_of_that_class(tmp_path, monkeypatch):
    """A causal-LM checkpoint loaded through the remote code as AutoModel, then saved by transformers: the
    record must name that class's modules (the file says architectures=["GPT2Model"]); it kept the saved
    class's ("transformer.h.0.ln_1") and neither reader could load the folder."""
    from transformers import AutoModel
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = tiny_lm("gpt2")
    hf_adanorm.patch_model(model, "adanorm")
    save_pretrained(model, tmp_path / "a")
    AutoModel.from_pretrained(tmp_path / "a", trust_remote_code=True).save_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["architectures"] == ["GPT2Model"] and "h.0.ln_1" in config["hf_adanorm"]["modules"]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval().transformer(input_ids=ids).last_hidden_state
        for loaded in (from_pretrained(AutoModel, tmp_path / "b"),
                       AutoModel.from_pretrained(tmp_path / "b", trust_remote_code=True)):
            torch.testing.assert_close(loaded.eval()(input_ids=ids).last_hidden_state, expected,
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("saved", ["LlamaForSequenceClassification", "LlamaModel"])
def test_a_generic_task_head_loads_through_the_remote_code(tmp_path, monkeypatch, saved):
    """transformers 5's generic heads build their base with AutoModel.from_config(config): that asked to run
    the remote code again (a 15 s prompt, then ValueError), and the base it built patched itself, so the head
    refused the record ("is a HFAdaNorm, not a norm"). The stock base is built inside, and only meanwhile."""
    import transformers
    from transformers import AutoModel, AutoModelForSequenceClassification
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, saved)(config)
    hf_adanorm.patch_model(model, "layernorm_simple", include_rmsnorm=True, fold_affine=True)
    save_pretrained(model, tmp_path / "ckpt")
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("transformers asked whether to run the code"))
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    library = from_pretrained(AutoModelForSequenceClassification, tmp_path / "ckpt").eval()
    assert type(remote.model.layers[0].input_layernorm).__name__ == "HFAdaNorm"
    # only while the head is built: AutoModel never builds this checkpoint as the stock (unpatched) base
    assert AutoModel._model_mapping._extra_content.get(type(remote.config)) is not transformers.LlamaModel
    if saved == "LlamaForSequenceClassification":  # (a saved base gives each loader a new random head)
        ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(remote(input_ids=ids).logits, library(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(remote(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)

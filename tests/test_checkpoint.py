"""save_pretrained / from_pretrained / push_to_hub: round trips, remote code, model card, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

import hf_adanorm
from hf_adanorm.checkpoint import CheckpointError, from_pretrained, push_to_hub, save_pretrained
from hf_adanorm.remote_code import MODELING_FILE
from test_fold import logits, tiny_lm

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(3))


def run_python(code: str, tmp_path: Path, *, with_plugin: bool) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, from ``tmp_path``, offline.

    Without the plugin, ``import hf_adanorm`` is made impossible (the repo is off
    sys.path and the name is blocked), so only torch and transformers can serve.
    """
    prelude = "import sys\n"
    if not with_plugin:
        prelude += ("sys.path[:] = [p for p in sys.path if not (p and __import__('os').path.isdir("
                    "__import__('os').path.join(p, 'hf_adanorm')))]\nsys.modules['hf_adanorm'] = None\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(REPO) if with_plugin else ""}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def patched(model_type="gpt2", norm="adanorm", **options):
    model = tiny_lm(model_type)
    hf_adanorm.patch_model(model, norm, **options)
    return model


ROUND_TRIPS = {  # one fresh interpreter loads them all (starting one costs seconds)
    "gpt2_adanorm_folded": ("gpt2", "adanorm", dict(fold_affine=True, k=0.2, C=2.0)),
    "llama_detachnorm_rms": ("llama", "detachnorm", dict(include_rmsnorm=True, detach="variance",
                                                         eps_mode="fairseq")),
}


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_is_bitwise(tmp_path):
    expected = {}
    for name, (model_type, norm, options) in ROUND_TRIPS.items():
        model = patched(model_type, norm, **options)
        save_pretrained(model, tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids=IDS).logits
    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    run_python(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        from hf_adanorm import get_patch_record
        from hf_adanorm.checkpoint import from_pretrained
        out = {{}}
        for name in {sorted(ROUND_TRIPS)!r}:
            model, info = from_pretrained(AutoModelForCausalLM, name, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            assert type(model).__module__.startswith("transformers.models."), type(model)
            assert get_patch_record(model)["modules"]
            with torch.no_grad():
                out[name] = model.eval()(input_ids=load_file("ids.safetensors")["ids"]).logits
        save_file(out, "out.safetensors")
    """, tmp_path, with_plugin=True)
    got = load_file(tmp_path / "out.safetensors")
    for name, logits_before in expected.items():
        assert torch.equal(got[name], logits_before), name


def test_loaded_model_is_patched_like_the_saved_one(tmp_path):
    model = patched("gpt2", "adanorm", fold_affine=True)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path).eval()
    assert type(loaded) is type(model)
    record = hf_adanorm.get_patch_record(loaded)
    assert record["modules"] == hf_adanorm.get_patch_record(model)["modules"]
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert loaded.lm_head.bias is not None and loaded.config.tie_word_embeddings is False
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="rebuilt from a patch record"):
        hf_adanorm.unpatch_model(loaded)


@pytest.mark.slow
def test_remote_code_loads_without_hf_adanorm(tmp_path):
    model = patched("gpt2", "adanorm", fold_affine=True)
    save_pretrained(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_adanorm.GPT2LMHeadModel"
    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    run_python("""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        try:
            import hf_adanorm
        except ImportError:
            pass
        else:
            raise SystemExit("hf_adanorm must not be importable here")
        model, info = AutoModelForCausalLM.from_pretrained("ckpt", trust_remote_code=True,
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        norm = model.transformer.h[0].ln_1
        assert type(norm).__name__ == "HFAdaNorm", type(norm)
        assert type(norm).__module__.startswith("transformers_modules."), type(norm).__module__
        with torch.no_grad():
            out = model.eval()(input_ids=load_file("ids.safetensors")["ids"]).logits
        save_file({"logits": out}, "out.safetensors")
    """, tmp_path, with_plugin=False)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected,
                               rtol=1e-5, atol=1e-5)


def test_generated_code_is_small_deterministic_and_pickle_free(tmp_path):
    first, second = patched("gpt2"), patched("gpt2", "layernorm_simple", fold_affine=True)
    save_pretrained(first, tmp_path / "a")
    save_pretrained(second, tmp_path / "b")
    code_a = (tmp_path / "a" / MODELING_FILE).read_text()
    assert code_a == (tmp_path / "b" / MODELING_FILE).read_text()  # the record lives in config.json
    assert len(code_a.splitlines()) < 720  # (about 170 of them the norm detector, which both readers share)
    for banned in ("pickle", "torch.load", "hf_adanorm import", "import hf_adanorm", "eval(", "exec("):
        assert banned not in code_a


def test_model_card(tmp_path):
    model = patched("gpt2", "adanorm")
    save_pretrained(model, tmp_path, base_model="openai-community/gpt2",
                    metrics={"eval_loss": 1.25, "epoch": 3})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.library_name == "transformers"
    assert {"hf-adanorm", "adanorm", "custom_code"} <= set(card.data.tags)
    assert "| eval_loss | 1.25 |" in card.text
    record = json.loads(card.text.split("```json\n")[1].split("\n```")[0])
    assert record == json.loads((tmp_path / "config.json").read_text())["hf_adanorm"]
    # only Auto classes read auto_map: GPT2LMHeadModel.from_pretrained would drop the norms
    assert "transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card.text
    assert "GPT2LMHeadModel.from_pretrained" not in card.text


def test_resave_without_remote_code_removes_the_stale_modeling_file(tmp_path):
    save_pretrained(patched("gpt2", "layernorm_simple"), tmp_path)  # plain=True can save it too
    assert (tmp_path / MODELING_FILE).is_file()
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path)
    assert not getattr(loaded.config, "auto_map", None)  # entries for the remote code are dropped on loading
    for options in (dict(remote_code=False), dict(plain=True)):
        save_pretrained(loaded, tmp_path, **options)
        assert not (tmp_path / MODELING_FILE).exists(), options
        assert "auto_map" not in json.loads((tmp_path / "config.json").read_text()), options
        assert "custom_code" not in ModelCard.load(tmp_path / "README.md").data.tags
        save_pretrained(loaded, tmp_path)  # and back: remote code again
        assert (tmp_path / MODELING_FILE).is_file()


def test_plain_checkpoint_loads_with_stock_transformers(tmp_path):
    original = tiny_lm("llama")
    expected = logits(original)
    hf_adanorm.patch_model(original, "layernorm_simple", fold_affine=True, include_rmsnorm=True)
    save_pretrained(original, tmp_path, plain=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "hf_adanorm" not in config and "auto_map" not in config
    assert not (tmp_path / MODELING_FILE).exists()
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(stock.model.norm.weight, torch.ones(32))
    torch.testing.assert_close(logits(stock.eval()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,norm,options,match", [
    ("gpt2", "adanorm", {}, "layernorm_simple"),
    ("gpt2", "layernorm_simple", {"fold_affine": True}, "lm_head a bias"),
])
def test_plain_is_refused_when_stock_cannot_compute_it(tmp_path, model_type, norm, options, match):
    model = patched(model_type, norm, **options)
    with pytest.raises(ValueError, match=match):
        save_pretrained(model, tmp_path / "out", plain=True)
    assert not (tmp_path / "out").exists()


def _saved_config(tmp_path) -> Path:
    save_pretrained(patched("gpt2"), tmp_path)
    return tmp_path / "config.json"


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(format_version=99), "newer hf_adanorm"),
    (lambda r: r.update(format_version="1"), "corrupted"),
    (lambda r: r.pop("modules"), "corrupted"),
    (lambda r: r["modules"].update({"transformer.h.0.ln_1": {"kind": "layernorm", "size": -1}}), "corrupted"),
    (lambda r: r["config"].update(norm="supernorm"), "supernorm"),
    (lambda r: r["config"].update(k=-1.0), "corrupted"),
    (lambda r: r["modules"].update({"transformer.nope": {"kind": "layernorm", "size": 32, "eps": 1e-5}}),
     "does not have"),
])
def test_bad_records_are_clear_errors(tmp_path, edit, match):
    path = _saved_config(tmp_path)
    config = json.loads(path.read_text())
    edit(config["hf_adanorm"])
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(AutoModelForCausalLM, tmp_path)


def test_unpatched_checkpoint_and_pickle_are_refused(tmp_path):
    tiny_lm("gpt2").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a patched checkpoint"):
        from_pretrained(AutoModelForCausalLM, tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        from_pretrained(AutoModelForCausalLM, tmp_path, use_safetensors=False)
    with pytest.raises(ValueError, match="not patched"):
        save_pretrained(tiny_lm("gpt2"), tmp_path / "x")


def test_push_to_hub_uploads_what_save_writes(tmp_path, monkeypatch):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["private"] = kwargs.get("private")
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), kwargs=kwargs)
        loaded = from_pretrained(AutoModelForCausalLM, folder_path).eval()  # what the hub would serve
        uploaded["logits"] = logits(loaded)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = patched("gpt2", "adanorm", fold_affine=True)
    assert push_to_hub(model, "me/tiny-adanorm", private=True, metrics={"acc": 0.5}) == "commit-info"
    assert uploaded["repo_id"] == "me/tiny-adanorm" and uploaded["private"] is True
    assert uploaded["files"] == sorted(["README.md", "config.json", "generation_config.json",
                                        "model.safetensors", MODELING_FILE])
    assert torch.equal(uploaded["logits"], logits(model))


def test_ddp_wrapped_model_is_unwrapped_and_only_main_process_writes(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    model = patched("gpt2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert save_pretrained(wrapped, tmp_path / "main") == tmp_path / "main"
        assert save_pretrained(wrapped, tmp_path / "other", is_main_process=False) is None
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "other").exists()
    config = json.loads((tmp_path / "main" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert not any(k.startswith("module.") for k in load_file(tmp_path / "main" / "model.safetensors"))


def test_a_torch_compile_wrapper_is_unwrapped(tmp_path):
    model = patched("gpt2", "adanorm")
    compiled = torch.compile(model)  # an OptimizedModule around it; nothing is compiled before a call
    assert save_pretrained(compiled, tmp_path) == tmp_path
    assert not any(k.startswith("_orig_mod.") for k in load_file(tmp_path / "model.safetensors"))
    assert torch.equal(logits(from_pretrained(AutoModelForCausalLM, tmp_path).eval()), logits(model))


def test_minilm_round_trip(tmp_path, minilm, minilm_inputs):
    hf_adanorm.patch_model(minilm, "adanorm")
    save_pretrained(minilm, tmp_path, remote_code=True)
    loaded = from_pretrained(AutoModel, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**minilm_inputs).last_hidden_state, minilm(**minilm_inputs).last_hidden_state)
    assert ModelCard.load(tmp_path / "README.md").data.base_model is None  # a local path is no hub id


def test_the_models_own_save_pretrained_writes_the_same(tmp_path):
    import copy
    model = patched("gpt2", "adanorm", fold_affine=True, exact_unfold=True)
    model.save_pretrained(tmp_path / "own", state_dict=model.state_dict(), is_main_process=True)  # as Trainer
    save_pretrained(model, tmp_path / "explicit")
    for name in ("config.json", MODELING_FILE, "README.md"):
        assert (tmp_path / "own" / name).read_text() == (tmp_path / "explicit" / name).read_text(), name
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "own").eval()
    assert torch.equal(logits(loaded), logits(model))
    copy.deepcopy(loaded).save_pretrained(tmp_path / "copy")  # the hook follows copies
    assert (tmp_path / "copy" / MODELING_FILE).exists()
    hf_adanorm.unpatch_model(model)
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / MODELING_FILE).exists()


def test_a_checkpoint_saved_before_the_guard_still_loads(tmp_path):
    """Folders written by earlier versions carry the stock model_type and no hf_adanorm_stock."""
    model = patched("gpt2", "adanorm", fold_affine=True)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    stock = config.pop("hf_adanorm_stock")
    config.update(model_type=stock["base_model_type"], **{stock["field"][0]: stock["value"]})
    config["auto_map"] = {k: v for k, v in config["auto_map"].items() if k != "AutoConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(from_pretrained(AutoModelForCausalLM, tmp_path).eval()), logits(model))


@pytest.mark.parametrize("model_type,loaded_class", [("bert", "BertForPreTraining"), ("roberta", "RobertaForCausalLM")])
@pytest.mark.parametrize("reader", ["hf_adanorm", "remote code"])
def test_a_head_shared_with_another_class_keeps_its_patched_norm(tmp_path, monkeypatch, model_type, loaded_class,
                                                                  reader):
    """transformers loads a saved head's weights into another class that has the same head at the same
    path (BertForMaskedLM -> BertForPreTraining): its norm must come back patched too, not as a stock
    norm of gain 1 and bias 0 beside the loaded weights."""
    import transformers
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    config = transformers.AutoConfig.for_model(model_type, vocab_size=100, num_hidden_layers=2, hidden_size=32,
                                               intermediate_size=64, num_attention_heads=2,
                                               max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(config).eval()
    hf_adanorm.patch_model(model, "adanorm")
    with torch.no_grad():  # the head norm's gain and bias are dropped by the patch: what it computes counts
        for name, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    save_pretrained(model, tmp_path / "ckpt")
    cls = getattr(transformers, loaded_class)
    if reader == "hf_adanorm":
        loaded = from_pretrained(cls, tmp_path / "ckpt")
    else:
        auto = transformers.AutoModelForPreTraining if model_type == "bert" else AutoModelForCausalLM
        loaded = auto.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
        assert type(loaded).__name__ == loaded_class
    with torch.no_grad():
        out = loaded.eval()(input_ids=IDS)
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(getattr(out, "prediction_logits", None) if model_type == "bert" else out.logits,
                               expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reader", ["hf_adanorm", "remote code"])
@pytest.mark.parametrize("how", ["dtype=bfloat16", "saved in bfloat16"])
def test_bfloat16_loads(tmp_path, monkeypatch, reader, how):
    """transformers builds a bfloat16 model under torch's default dtype bfloat16: the record check's
    norm probe must still run in float32 (it refused every norm as 'not a norm' before)."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = patched("gpt2", "adanorm")
    if how == "saved in bfloat16":
        save_pretrained(model.to(torch.bfloat16), tmp_path / "ckpt")
        kwargs = {}
    else:
        save_pretrained(model, tmp_path / "ckpt")
        model.to(torch.bfloat16)
        kwargs = {"dtype": torch.bfloat16}
    if reader == "hf_adanorm":
        loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "ckpt", **kwargs)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, **kwargs)
    assert loaded.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=0.02, atol=0.02)  # logits ~0.1


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_dtype_auto_and_other_loading_options_reach_the_model_not_the_config(tmp_path, saved_dtype):
    """dtype="auto" (the checkpoint's dtype), device_map and attn_implementation are options of the model's
    from_pretrained: read as config values they failed (torch has no dtype "auto")."""
    model = patched("gpt2", "adanorm").to(saved_dtype)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path, dtype="auto", device_map="cpu",
                             attn_implementation="eager", num_labels=3)
    assert loaded.dtype == saved_dtype and loaded.config.num_labels == 3  # (a config value still is one)
    assert loaded.config._attn_implementation == "eager"  # (the saved model: sdpa, equal to round-off)
    tolerance = 1e-5 if saved_dtype == torch.float32 else 0.02
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("options", [{}, {"fold_affine": True}])
def test_a_gemma_with_layernorm_simple_loads(tmp_path, monkeypatch, options):
    """Gemma's _init_weights zeroes the weight of every module with "RMSNorm" in its class name, which
    RMSNormSimple has and no weight: loading raised an AttributeError."""
    import test_fold
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setitem(test_fold.TINY, "gemma", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    model = patched("gemma", "layernorm_simple", include_rmsnorm=True, **options)
    assert any(type(m).__name__ == "RMSNormSimple" for m in model.modules())
    save_pretrained(model, tmp_path / "ckpt")
    for loaded in (from_pretrained(AutoModelForCausalLM, tmp_path / "ckpt"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)):
        torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=1e-5, atol=1e-5)

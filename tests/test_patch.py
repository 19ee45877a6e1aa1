"""patch_model / unpatch_model on the real pretrained MiniLM and on small hand-built models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_adanorm import (AdaNorm, DetachNorm, LayerNormSimple, NoNorm, RMSAdaNorm, get_patch_record,
                        is_patched, patch_model, unpatch_model)
from hf_adanorm.record import get_state

MINILM_NORMS = ["embeddings.LayerNorm"] + [
    f"encoder.layer.{i}.{part}.LayerNorm" for i in range(6) for part in ("attention.output", "output")
]
NORM_CLASSES = {"layernorm_simple": LayerNormSimple, "adanorm": AdaNorm, "detachnorm": DetachNorm,
                "no_norm": NoNorm}


def tiny_bert(**overrides) -> BertModel:
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, **overrides)
    torch.manual_seed(0)
    return BertModel(config).eval()


def bert_inputs():
    return {"input_ids": torch.tensor([[1, 5, 9, 13, 2], [1, 7, 3, 2, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}


class HeadNorm(nn.Module):
    """A per-head q/k norm: 2-D weight (heads, head_dim)."""

    def __init__(self, heads=2, dim=4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x):
        return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


class ChannelsFirstNorm(nn.Module):
    """A ConvNeXt-style LayerNorm over dim 1, with no ``data_format`` attribute to give it away."""

    def __init__(self, channels):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        y = (x - x.mean(1, keepdim=True)) / (x.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        return self.weight[:, None] * y + self.bias[:, None]


def norm_zoo() -> nn.ModuleDict:
    """Every kind of norm-like module: only the four last-dimension LayerNorms may be replaced."""
    return nn.ModuleDict(dict(
        ln=nn.LayerNorm(8, eps=1e-3),
        ln_no_bias=nn.LayerNorm(8, bias=False),
        ln_no_affine=nn.LayerNorm(8, elementwise_affine=False),
        convnext_last=ConvNextLayerNorm(8, data_format="channels_last"),
        convnext_first=ConvNextLayerNorm(8, data_format="channels_first"),
        channels_first=ChannelsFirstNorm(8),
        batch=nn.BatchNorm1d(8), group=nn.GroupNorm(2, 8), instance=nn.InstanceNorm1d(8),
        per_head=HeadNorm(), rms=nn.RMSNorm(8), llama_rms=LlamaRMSNorm(8),
        weight_normed=nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
        linear=nn.Linear(8, 8),
    ))


ZOO_LAYERNORMS = {"ln", "ln_no_bias", "ln_no_affine", "convnext_last"}


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> Linear -> LayerNorm, for hooks, flags and dtypes."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm1 = nn.Linear(4, 8), nn.LayerNorm(8)
        self.mid, self.norm2 = nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-3)

    def forward(self, x):
        return self.norm2(self.mid(self.norm1(self.inp(x))))


# ---------------------------------------------------------------- the real pretrained MiniLM

@pytest.mark.parametrize("norm,options", [("adanorm", {}), ("layernorm_simple", {}),
                                          ("adanorm", {"eps_mode": "fairseq", "k": 0.2, "C": 2.0})])
def test_minilm_patch_run_unpatch_is_bitwise(minilm, minilm_inputs, norm, options):
    with torch.no_grad():
        before = minilm(**minilm_inputs).last_hidden_state
    originals = {name: minilm.get_submodule(name) for name in MINILM_NORMS}
    state = {k: v.clone() for k, v in minilm.state_dict().items()}

    report = patch_model(minilm, norm, **options)
    assert sorted(e.name for e in report.replaced) == sorted(MINILM_NORMS)
    assert report.skipped == []
    for name in MINILM_NORMS:
        new = minilm.get_submodule(name)
        assert type(new) is NORM_CLASSES[norm]
        assert new.normalized_shape == (384,) and new.eps == 1e-12  # MiniLM's own eps is kept
    with torch.no_grad():
        patched = minilm(**minilm_inputs).last_hidden_state
    assert patched.shape == before.shape and torch.isfinite(patched).all()
    assert not torch.allclose(patched, before, atol=1e-3)  # the swap is on the forward path

    unpatch_model(minilm)
    with torch.no_grad():
        after = minilm(**minilm_inputs).last_hidden_state
    assert torch.equal(after, before)
    assert all(minilm.get_submodule(name) is module for name, module in originals.items())
    assert minilm.state_dict().keys() == state.keys()
    assert all(torch.equal(minilm.state_dict()[k], v) for k, v in state.items())


def test_minilm_record_is_complete_json_and_removed_by_unpatch(minilm):
    patch_model(minilm, "adanorm", k=0.2, C=1.5, eps_mode="fairseq")
    record = get_patch_record(minilm)
    assert is_patched(minilm) and json.loads(json.dumps(record)) == record
    # the record lives on the model only: a config object may be shared with another model
    assert not hasattr(minilm.config, "hf_adanorm") and "hf_adanorm" not in minilm.config.to_dict()
    assert record["config"]["norm"] == "adanorm"
    config = record["config"]
    assert (config["k"], config["C"], config["eps_mode"]) == (0.2, 1.5, "fairseq")
    assert sorted(record["modules"]) == sorted(MINILM_NORMS)
    for entry in record["modules"].values():
        assert (entry["kind"], entry["eps"], entry["size"]) == ("layernorm", 1e-12, 384)
        assert (entry["original_class"], entry["gain"], entry["bias"]) == ("LayerNorm", "weight", "bias")

    unpatch_model(minilm)
    assert not is_patched(minilm) and get_patch_record(minilm) is None
    assert not hasattr(minilm.config, "hf_adanorm") and "hf_adanorm" not in minilm.config.to_dict()


def test_minilm_report_says_what_the_swap_drops(minilm):
    report = patch_model(minilm, "layernorm_simple")
    assert report.norm == "layernorm_simple" and "drops the gain and bias" in report.effect
    for entry in report.replaced:  # pretrained gains and biases are far from the identity
        assert entry.action == "replaced" and entry.replacement == "LayerNormSimple"
        assert "drops gain (max |gain - 1|" in entry.reason and "drops bias" in entry.reason
    text = str(report)
    assert "replaced 13 module(s) with 'layernorm_simple'" in text and MINILM_NORMS[-1] in text
    assert json.loads(json.dumps(report.to_dict()))["entries"][0]["name"] == "embeddings.LayerNorm"


def test_minilm_dry_run_changes_nothing(minilm, state_of, assert_unchanged):
    before = state_of(minilm)
    report = patch_model(minilm, "adanorm", dry_run=True)
    assert report.dry_run and [e.action for e in report.replaced] == ["would replace"] * 13
    assert "would replace 13" in str(report)
    assert_unchanged(minilm, before)
    assert not is_patched(minilm)


def test_minilm_include_exclude_filter(minilm):
    def replaced(**options):
        names = [e.name for e in patch_model(minilm, "adanorm", **options).replaced]
        unpatch_model(minilm)
        return sorted(names)

    attention = sorted(n for n in MINILM_NORMS if "attention" in n)
    assert replaced(include=r"encoder\.layer\.\d+\.attention\.output\.LayerNorm") == attention
    assert replaced(exclude=r".*attention.*") == sorted(set(MINILM_NORMS) - set(attention))
    # a list holds exact names or ".suffix" matches (PEFT-style), never substrings
    assert replaced(include=["embeddings.LayerNorm", "layer.5.output.LayerNorm"]) == \
        ["embeddings.LayerNorm", "encoder.layer.5.output.LayerNorm"]
    assert replaced(include=["LayerNorm"], exclude=["embeddings.LayerNorm"]) == MINILM_NORMS[1:]
    with pytest.raises(ValueError, match="no module matched"):  # a name prefix is not a suffix
        patch_model(minilm, "adanorm", include=["encoder.layer.1"])
    assert replaced(filter_fn=lambda module, name: name.startswith("encoder.layer.0.")) == MINILM_NORMS[1:3]
    report = patch_model(minilm, "adanorm", exclude=["embeddings.LayerNorm"])
    (skipped,) = report.skipped
    assert (skipped.name, skipped.kind, skipped.reason) == ("embeddings.LayerNorm", "layernorm",
                                                            "matched by exclude")


def test_minilm_keeps_training_mode_and_requires_grad(minilm, minilm_inputs):
    minilm.train()
    minilm.encoder.layer[1].output.LayerNorm.eval()
    minilm.embeddings.requires_grad_(False)
    minilm.encoder.layer[0].output.LayerNorm.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in minilm.named_parameters()}
    patch_model(minilm, "adanorm")
    assert minilm.encoder.layer[1].output.LayerNorm.training is False
    assert [minilm.get_submodule(n).training for n in MINILM_NORMS].count(False) == 1
    assert all(p.requires_grad == flags[name] for name, p in minilm.named_parameters())
    minilm(**minilm_inputs).last_hidden_state.sum().backward()  # trains through the new norms
    assert minilm.encoder.layer[0].attention.self.query.weight.grad is not None
    unpatch_model(minilm)
    assert {name: p.requires_grad for name, p in minilm.named_parameters()} == flags
    assert minilm.encoder.layer[1].output.LayerNorm.training is False
    assert minilm.encoder.layer[2].output.LayerNorm.weight.grad is None  # originals were off the graph


# ---------------------------------------------------------------- what is and is not replaced

def test_only_last_dimension_layernorms_are_replaced():
    zoo = norm_zoo()
    report = patch_model(zoo, "adanorm")
    assert {e.name for e in report.replaced} == ZOO_LAYERNORMS
    for name, module in zoo.items():
        assert isinstance(module, AdaNorm) == (name in ZOO_LAYERNORMS), name
    assert zoo["ln"].eps == 1e-3 and zoo["ln_no_affine"].eps == 1e-5
    skipped = {e.name: e for e in report.skipped}
    assert "does not normalize over the last dimension" in skipped["batch"].reason
    assert "does not normalize over the last dimension" in skipped["group"].reason
    assert "channels_first" in skipped["convnext_first"].reason
    assert "per-head" in skipped["per_head"].reason
    assert skipped["rms"].kind == skipped["llama_rms"].kind == "rmsnorm"
    assert "include_rmsnorm=True" in skipped["rms"].reason
    assert report.entries[0].reason == "gain and bias are the identity: nothing dropped"


def test_include_rmsnorm_swaps_rmsnorms_for_the_rms_counterpart():
    zoo = norm_zoo()
    report = patch_model(zoo, "adanorm", include_rmsnorm=True, k=0.3)
    assert {e.name for e in report.replaced} == ZOO_LAYERNORMS | {"rms", "llama_rms"}
    assert type(zoo["rms"]) is RMSAdaNorm and zoo["rms"].k == 0.3
    assert zoo["llama_rms"].eps == 1e-6  # LlamaRMSNorm's variance_epsilon


@pytest.mark.parametrize("norm,options", [("detachnorm", {"detach": "mean"}), ("detachnorm", {}),
                                          ("no_norm", {}), ("adanorm", {"C": 3.0})])
def test_tiny_bert_patch_run_unpatch_is_bitwise(norm, options):
    model = tiny_bert()
    with torch.no_grad():  # "pretrained" gains and biases, so that dropping them shows
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        before = model(**bert_inputs()).last_hidden_state
    report = patch_model(model, norm, **options)
    assert len(report.replaced) == 5 and type(model.embeddings.LayerNorm) is NORM_CLASSES[norm]
    with torch.no_grad():
        patched = model(**bert_inputs()).last_hidden_state
    assert torch.isfinite(patched).all() and not torch.allclose(patched, before, atol=1e-3)
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(**bert_inputs()).last_hidden_state, before)


def test_a_norm_shared_under_two_names_is_replaced_under_both():
    norm = nn.LayerNorm(8)
    model = nn.ModuleDict(dict(first=norm, second=norm, inner=nn.Sequential(norm)))
    report = patch_model(model, "adanorm")
    assert [e.name for e in report.replaced] == ["first", "second", "inner.0"]
    assert type(model.first) is AdaNorm and model.first is model.second is model.inner[0]  # still tied
    unpatch_model(model)
    assert model.first is norm and model.second is norm and model.inner[0] is norm


def test_identity_affine_layernorm_is_exactly_layernorm_simple():
    """A freshly initialised BERT has gain 1, bias 0: swapping in LayerNorm-simple with
    the same eps must leave its function unchanged (so each swap sits where the norm was)."""
    model = tiny_bert()
    with torch.no_grad():
        before = model(**bert_inputs()).last_hidden_state
        patch_model(model, "layernorm_simple")
        after = model(**bert_inputs()).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_layernorm_without_bias_or_affine_forward():
    net = nn.Sequential(nn.LayerNorm(8, bias=False), nn.LayerNorm(8, elementwise_affine=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = net(x)
    report = patch_model(net, "layernorm_simple")
    assert len(report.replaced) == 2
    assert [get_patch_record(net)["modules"][n]["bias"] for n in ("0", "1")] == [None, None]
    torch.testing.assert_close(net(x), before)
    unpatch_model(net)
    assert torch.equal(net(x), before)


def test_dtype_is_kept():
    net = TinyNet().to(torch.bfloat16)
    patch_model(net, "adanorm")
    out = net(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_meta_device_model_is_patched_without_materializing():
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32))
    report = patch_model(model, "adanorm")
    assert len(report.replaced) == 5
    assert all(p.is_meta for p in model.parameters())
    originals = get_state(model).originals
    assert all(p.is_meta for module in originals.values() for p in module.parameters())
    assert report.replaced[0].reason == "drops gain; drops bias"  # cannot measure meta values
    unpatch_model(model)
    assert all(p.is_meta for p in model.parameters()) and len(list(model.parameters())) == \
        len(list(BertModel(model.config, add_pooling_layer=True).parameters()))


# ---------------------------------------------------------------- hooks

def test_torch_hooks_are_kept_and_called():
    net, calls = TinyNet(), []
    net.norm1.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__)))
    net.norm1.register_forward_hook(lambda m, args, out: calls.append(("post", type(m).__name__)))
    net.norm1.register_forward_hook(lambda m, args, kwargs, out: out * 2, with_kwargs=True)
    net.norm2.register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", type(m).__name__)))
    x = torch.randn(2, 4, requires_grad=True)
    patch_model(net, "layernorm_simple")
    net(x).sum().backward()
    assert calls == [("pre", "LayerNormSimple"), ("post", "LayerNormSimple"), ("backward", "LayerNormSimple")]
    with torch.no_grad():  # the doubling hook still shapes the output
        y = net.norm1(net.inp(x))
        torch.testing.assert_close(y, 2 * LayerNormSimple(8)(net.inp(x)))
    unpatch_model(net)
    calls.clear()
    net(x).sum().backward()
    assert calls == [("pre", "LayerNorm"), ("post", "LayerNorm"), ("backward", "LayerNorm")]


def test_hook_handles_still_remove_hooks_after_the_swap():
    net, calls = TinyNet(), []
    handle = net.norm1.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    patch_model(net, "adanorm")
    net(torch.randn(2, 4))
    handle.remove()
    net(torch.randn(2, 4))
    unpatch_model(net)
    net(torch.randn(2, 4))
    assert calls == ["AdaNorm"]


def test_accelerate_hooks_are_kept_and_called():
    from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module

    class CountingHook(ModelHook):
        def __init__(self):
            self.calls = []

        def pre_forward(self, module, *args, **kwargs):
            self.calls.append(("pre", type(module).__name__))
            return args, kwargs

        def post_forward(self, module, output):
            self.calls.append(("post", type(module).__name__))
            return output

    net, counter = TinyNet(), CountingHook()
    add_hook_to_module(net.norm1, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    add_hook_to_module(net.norm2, counter)
    patch_model(net, "adanorm")
    assert isinstance(net.norm1._hf_hook, AlignDevicesHook) and net.norm2._hf_hook is counter
    out = net(torch.randn(2, 4))
    assert torch.isfinite(out).all()
    assert counter.calls == [("pre", "AdaNorm"), ("post", "AdaNorm")]
    unpatch_model(net)
    net(torch.randn(2, 4))
    assert counter.calls[2:] == [("pre", "LayerNorm"), ("post", "LayerNorm")]

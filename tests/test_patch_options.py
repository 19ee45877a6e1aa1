"""Honest options, wrappers refused with what to do, detection of large-eps and parametrized norms."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

import hf_adanorm
from hf_adanorm import AdaNorm, DetachNorm, LayerNormSimple, NoNorm, NormConfig, patch_model
from test_fold import tiny_lm
from test_patch import tiny_bert

# ------------------------------------------------------------------ options the norm does not use


@pytest.mark.parametrize("norm,options", [
    ("layernorm_simple", dict(k=0.5, C=3.0)),
    ("layernorm_simple", dict(k=0.1)),  # even at its default: the caller believes it does something
    ("adanorm", dict(detach="mean")),
    ("detachnorm", dict(C=2.0)),
    ("no_norm", dict(eps=1e-5)),
    ("no_norm", dict(eps_mode="fairseq")),
])
def test_options_the_norm_does_not_use_are_refused(norm, options, state_of, assert_unchanged):
    model = tiny_bert()
    before = state_of(model)
    with pytest.raises(ValueError, match=rf"norm '{norm}' does not use the option"):
        patch_model(model, norm, **options)
    assert_unchanged(model, before)
    changed = {k: v for k, v in options.items() if v != getattr(NormConfig, k)}
    if changed:  # a NormConfig holds every field: only non-default values of unused ones are wrong
        with pytest.raises(ValueError, match=rf"norm '{norm}' does not use"):
            NormConfig(norm=norm, **changed)


def test_exact_unfold_needs_fold_affine_and_flags_must_be_bools():
    with pytest.raises(ValueError, match="exact_unfold=True only applies with fold_affine=True"):
        NormConfig(norm="layernorm_simple", exact_unfold=True)
    with pytest.raises(TypeError, match="fold_affine must be True or False"):
        NormConfig(norm="layernorm_simple", fold_affine="yes")


def test_detach_mean_on_rmsnorms_is_refused_but_fine_on_layernorms(state_of, assert_unchanged):
    model = tiny_lm("llama")
    before = state_of(model)
    with pytest.raises(ValueError, match=r"detach='mean' does nothing on RMSNorm modules"):
        patch_model(model, "detachnorm", detach="mean", include_rmsnorm=True)
    assert_unchanged(model, before)
    patch_model(tiny_bert(), "detachnorm", detach="mean")  # LayerNorms have a mean to detach


# ------------------------------------------------------------------ eps


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.inf, math.nan, "1e-5", True])
def test_eps_must_be_finite_and_positive_everywhere(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        NormConfig(norm="adanorm", eps=eps)
    for cls in (LayerNormSimple, AdaNorm, DetachNorm, NoNorm):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            cls(8, eps=eps)


def test_a_module_with_eps_zero_needs_an_eps_override(state_of, assert_unchanged):
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=0.0))
    before = state_of(net)
    with pytest.raises(ValueError, match=r"1 \(LayerNorm\) has eps=0.0.*pass eps=\.\.\. to patch_model"):
        patch_model(net, "layernorm_simple")
    assert_unchanged(net, before)
    patch_model(net, "layernorm_simple", eps=1e-6)
    assert net[1].eps == 1e-6


# ------------------------------------------------------------------ k |y| >= 1


def _measured_share(k: float) -> float:
    """Share of elements with k |y| >= 1 for LayerNorm-normalized Gaussian rows (measured)."""
    x = torch.randn(4000, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.nn.functional.layer_norm(x, (256,))
    return float((k * y.abs() >= 1).double().mean())


@pytest.mark.parametrize("k", [0.1, 0.3, 0.38])
def test_no_warning_when_k_keeps_the_factor_positive_almost_always(k):
    assert _measured_share(k) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(tiny_bert(), "adanorm", k=k)


@pytest.mark.parametrize("k", [0.5, 1.0, 50.0])
def test_a_large_k_warns_with_the_share_of_flipped_elements(k):
    with pytest.warns(UserWarning, match=rf"k={k:g} makes k\*\|y\| >= 1 common") as caught:
        patch_model(tiny_bert(), "adanorm", k=k)
    stated = float(str(caught[0].message).split("about ")[1].split("%")[0]) / 100
    assert stated == pytest.approx(_measured_share(k), abs=0.01)


def test_no_warning_when_rows_are_too_short_for_k_abs_y_to_reach_one():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))  # |y| <= sqrt(3): k = 0.5 never reaches 1
    x = torch.randn(10000, 3, generator=torch.Generator().manual_seed(0)) * 5
    assert float((0.5 * torch.nn.functional.layer_norm(x, (3,)).abs()).max()) < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(net, "adanorm", k=0.5)
    with pytest.warns(UserWarning, match="k=0.6 makes"):
        patch_model(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "adanorm", k=0.6)


# ------------------------------------------------------------------ wrappers


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _bert_inside(wrap):
    model = tiny_bert()
    return model, wrap(model)


def _fully_shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    return fully_shard(model, mesh=init_device_mesh("cpu", (1,)))


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "switching to NO_SHARD": world size 1
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


WRAPPERS = {
    "torch.compile": (lambda m: torch.compile(m), r"patch wrapper._orig_mod and compile it again"),
    "DataParallel": (nn.DataParallel, r"patch wrapper.module, then wrap it"),
    "DistributedDataParallel": (nn.parallel.DistributedDataParallel, r"before wrapping it"),
    "FSDP": (_fsdp1, r"before sharding it"),
    "FSDP2": (_fully_shard, r"before sharding it"),
}


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_wrappers_are_refused_with_what_to_do(kind, one_rank_group):
    wrap, advice = WRAPPERS[kind]
    inner, wrapper = _bert_inside(wrap)
    layer_norms = [m for m in inner.modules() if type(m) is nn.LayerNorm]
    with pytest.raises(TypeError, match=advice):
        patch_model(wrapper, "adanorm")
    assert not hf_adanorm.is_patched(wrapper) and not hf_adanorm.is_patched(inner)
    assert [m for m in inner.modules() if type(m) is nn.LayerNorm] == layer_norms


def test_a_compiled_submodule_is_refused_by_name():
    model = tiny_bert()
    model.encoder = torch.compile(model.encoder)
    with pytest.raises(TypeError, match=r"'encoder' is wrapped by torch.compile"):
        patch_model(model, "adanorm")


def test_peft_model_is_refused_and_its_base_model_can_be_patched():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_lm("gpt2"), peft.LoraConfig(target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    with pytest.raises(TypeError, match=r"wrapped by PeftModel: patch the base model before get_peft_model"):
        patch_model(model, "adanorm")
    report = patch_model(model.get_base_model(), "adanorm")
    assert len(report.replaced) == 5 and "transformer.ln_f" in hf_adanorm.get_patch_record(
        model.get_base_model())["modules"]


def test_unpatch_through_a_wrapper_says_to_pass_the_inner_model():
    model = tiny_bert()
    patch_model(model, "adanorm")
    with pytest.raises(ValueError, match=r"a DataParallel wrapper: pass the model inside it"):
        hf_adanorm.unpatch_model(nn.DataParallel(model))


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 1e-1])
def test_layernorms_with_a_large_eps_are_found_with_their_eps(eps):
    net = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64, eps=eps))
    x = torch.randn(3, 64)
    with torch.no_grad():
        nn.init.ones_(net[1].weight), nn.init.zeros_(net[1].bias)
        before = net(x)
    report = patch_model(net, "layernorm_simple")
    assert [e.name for e in report.replaced] == ["1"]
    assert hf_adanorm.get_patch_record(net)["modules"]["1"]["eps"] == eps
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)  # identity affine: the same function


def test_a_parametrized_norm_is_reported_as_skipped_with_the_reason():
    class Positive(nn.Module):
        def forward(self, weight):
            return weight.abs()

    net = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8))
    parametrize.register_parametrization(net[2], "weight", Positive())
    report = patch_model(net, "layernorm_simple")
    assert [e.name for e in report.replaced] == ["0"]
    skipped = {e.name: e.reason for e in report.skipped}
    assert "has a parametrization on weight" in skipped["2"]


def test_dir_lists_the_lazy_names():
    names = dir(hf_adanorm)
    for name in ("PatchCallback", "save_pretrained", "from_pretrained", "CheckpointError", "patch_model"):
        assert name in names

"""A replaced norm returns its output in the dtype the original did.

T5-family norms cast their output to their gain's dtype. Loaded in float16, T5 keeps its ``wo`` layers in
float32 (``_keep_in_fp32_modules``), so the residual stream after them is float32 and the next norm gets a
float32 input: the original returns float16, and a replacement that kept the input's dtype fed float32
into a float16 Linear ("expected m1 and m2 to have the same dtype").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (AutoModelForSeq2SeqLM, LlamaConfig, T5Config, T5ForConditionalGeneration,
                          UMT5Config, UMT5ForConditionalGeneration)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

import hf_adanorm
from hf_adanorm.detect import classify

pytestmark = pytest.mark.usefixtures("one_thread")
NORMS = ["layernorm_simple", "adanorm", "detachnorm", "no_norm"]
FAMILY = {"t5": (T5Config, T5ForConditionalGeneration), "umt5": (UMT5Config, UMT5ForConditionalGeneration)}


@pytest.fixture(scope="module", params=sorted(FAMILY))
def saved_t5(request, tmp_path_factory):
    config_cls, model_cls = FAMILY[request.param]
    config = config_cls(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                        d_kv=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    model_cls(config).save_pretrained(path)
    return model_cls, path


def inputs():
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids}


def test_the_detector_tells_which_norms_return_their_gains_dtype():
    assert classify(T5LayerNorm(8))[0].output_in_gain_dtype
    assert not classify(LlamaRMSNorm(8))[0].output_in_gain_dtype  # weight * x.to(input dtype): promoted
    assert not classify(nn.LayerNorm(8))[0].output_in_gain_dtype
    assert not classify(nn.RMSNorm(8, elementwise_affine=False))[0].output_in_gain_dtype  # no gain
    assert not hasattr(LlamaConfig, "output_in_gain_dtype")  # (the flag is the norm's, not a config's)


def test_a_float32_input_gives_the_original_dtype_and_values():
    original = T5LayerNorm(8).half()
    with torch.no_grad():
        original.weight.copy_(torch.ones(8))
    model = nn.Sequential(original)
    hf_adanorm.patch_model(model, "layernorm_simple", include_rmsnorm=True)
    x = torch.randn(3, 8) * 4
    z = model(x)
    assert z.dtype == original(x).dtype == torch.float16
    reference = (x.double() / (x.double().pow(2).mean(-1, keepdim=True) + original.variance_epsilon).sqrt()).half()
    torch.testing.assert_close(z, reference, rtol=0, atol=0)
    model.float()  # the witness follows the model, as the gain would
    assert model(x).dtype == torch.float32


@pytest.mark.parametrize("norm", NORMS)
def test_t5_loaded_in_float16_runs_patched(saved_t5, norm):
    model_cls, path = saved_t5
    model = model_cls.from_pretrained(path, dtype=torch.float16).eval()
    assert model.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32  # the mixed case
    original = model(**inputs()).logits
    hf_adanorm.patch_model(model, norm, include_rmsnorm=True)
    patched = model(**inputs()).logits
    assert patched.dtype == original.dtype == torch.float16
    assert torch.isfinite(patched).all()


def test_the_exact_fold_stays_exact_in_float16_and_reloads(saved_t5, tmp_path):
    model_cls, path = saved_t5
    model = model_cls.from_pretrained(path, dtype=torch.float16).eval()
    original = model(**inputs()).logits
    hf_adanorm.patch_model(model, "layernorm_simple", include_rmsnorm=True, fold_affine=True)
    patched = model(**inputs()).logits
    torch.testing.assert_close(patched, original, rtol=0, atol=2e-3)  # pre-LN RMS norms: the fold is exact
    hf_adanorm.save_pretrained(model, tmp_path / "saved")
    for loaded in (hf_adanorm.from_pretrained(AutoModelForSeq2SeqLM, tmp_path / "saved", dtype=torch.float16),
                   AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved", dtype=torch.float16,
                                                         trust_remote_code=True)):
        out = loaded.eval()(**inputs()).logits
        assert out.dtype == torch.float16
        torch.testing.assert_close(out, patched, rtol=0, atol=0)


def test_gradients_flow_through_the_cast(saved_t5):
    model_cls, path = saved_t5
    model = model_cls.from_pretrained(path, dtype=torch.float16)
    hf_adanorm.patch_model(model, "adanorm", include_rmsnorm=True)
    model(**inputs()).logits.float().square().mean().backward()
    grad = model.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    assert grad is not None and grad.dtype == torch.float16 and grad.abs().sum() > 0


def test_a_float32_gain_casts_nothing():
    # T5 casts only to a half gain's dtype: with a float32 one, a float64 input stays float64
    original = T5LayerNorm(8).to(torch.float64)
    model = nn.Sequential(T5LayerNorm(8))
    hf_adanorm.patch_model(model, "adanorm", include_rmsnorm=True)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert model(x).dtype == original(x).dtype == torch.float64
    # FSDP2's mixed precision casts the parameters, not the buffers: the original's gain is then bf16 and
    # it returns bf16 for a bf16 input; the replacement, whose witness stayed float32, keeps the input's
    original = T5LayerNorm(8).to(torch.bfloat16)
    assert model(x.bfloat16()).dtype == original(x.bfloat16()).dtype == torch.bfloat16


def t5_with_two_layers(path):
    config = T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    return T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float16).eval()


@pytest.mark.parametrize("fold_affine", [False, True])
def test_the_gradual_swap_blends_in_the_original_dtype(tmp_path, fold_affine):
    # a folded norm's blend source is the plain normalization: it takes the target's dtype rule too
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_adanorm import GradualSwapCallback
    model = t5_with_two_layers(tmp_path / "t5")
    original = model(**inputs()).logits
    callback = GradualSwapCallback("layernorm_simple", ramp_steps=10, include_rmsnorm=True, fold_affine=fold_affine)
    callback.on_init_end(TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[]), TrainerState(),
                         TrainerControl(), model=model)
    for alpha in (0.0, 0.5, 1.0):
        for blended in callback.wrapped.values():
            blended.alpha = alpha
        out = model(**inputs()).logits
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        if alpha == 0.0:  # the blend starts at the teacher's function (up to half rounding in a fold)
            torch.testing.assert_close(out, original, rtol=1e-2, atol=5e-3)


def test_a_registered_norm_without_the_dtype_rule_is_warned_about(saved_t5):
    from hf_adanorm.registry import NORM_REGISTRY, register_norm

    class PlainRMS(nn.Module):
        def __init__(self, normalized_shape, eps, eps_mode):
            super().__init__()
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    register_norm("plain_rms_for_dtype_test", nn.LayerNorm, PlainRMS)
    try:
        model_cls, path = saved_t5
        model = model_cls.from_pretrained(path, dtype=torch.float16)
        with pytest.warns(UserWarning, match=r"PlainRMS has no output_in_dtype_of\(witness\) method"):
            hf_adanorm.patch_model(model, "plain_rms_for_dtype_test", include_rmsnorm=True)
    finally:
        NORM_REGISTRY.pop("plain_rms_for_dtype_test")

"""fold_affine=True must see every read of a norm's output, or refuse: a second head, an alias of the
module, an in-place change, a functional dropout, a read too small for the graph to show."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from arch_zoo import ARCHS, build

ARCH = {arch.model_type: arch for arch in ARCHS}
from torch import nn
from transformers import AutoConfig, AutoModelForPreTraining, GPT2DoubleHeadsModel

import hf_adanorm


def randomize_affine(model: nn.Module, seed: int = 1) -> nn.Module:
    """Gains in 0.5 .. 1.5 and biases N(0, 1) in every LayerNorm, so that dropping them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen, dtype=module.weight.dtype))
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=module.bias.dtype))
    return model


def neutralised(original: nn.Module, names) -> nn.Module:
    """``original`` with the affine of the norms ``names`` set to the identity: what layernorm_simple computes
    where it does not fold."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name in names:
            norm = reference.get_submodule(name)
            norm.weight.fill_(1.0)
            if norm.bias is not None:
                norm.bias.zero_()
    return reference


def outputs(model, **inputs) -> dict:
    with torch.no_grad():
        out = model(**inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k not in ("last_hidden_state",)}


def tiny_gpt2_double_heads():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return randomize_affine(GPT2DoubleHeadsModel(config).double().eval())


def tiny_bert_pretraining():
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return randomize_affine(AutoModelForPreTraining.from_config(config).double().eval())


@pytest.mark.parametrize("make, head", [(tiny_gpt2_double_heads, "mc_logits"),
                                        (tiny_bert_pretraining, "seq_relationship_logits")])
def test_a_second_head_that_reads_a_folded_norm_keeps_its_output(make, head):
    """GPT-2's multiple-choice head gathers from ln_f, which the LM head reads too; BERT's NSP head reads the
    last norm through the pooler. Folding that norm into the first head computed the second from y: mc_logits
    were off by 0.90, seq_relationship_logits by 1.13 (relative), and the report said "exact"."""
    original = make()
    ids = torch.randint(0, 50, (2, 3, 7) if head == "mc_logits" else (2, 7), generator=torch.Generator().manual_seed(5))
    model = copy.deepcopy(original)
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    assert fold["folded"], "the fixture should fold some norms, or the check below shows nothing"
    expected = outputs(neutralised(original, fold["not_foldable"]), input_ids=ids)
    got = outputs(model, input_ids=ids)
    assert head in got and sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-10, msg=key)
    if head == "mc_logits":
        assert "GatherBackward0" in fold["not_foldable"]["transformer.ln_f"]["reason"]
    assert fold["output_drift"] > 1e-3  # the largest over the outputs: ln_f's affine is dropped


def _with_config(model):
    model.config = AutoConfig.for_model("bert", vocab_size=50)
    model.main_input_name = "input_ids"
    return model


class Aliased(nn.Module):
    """One LayerNorm registered under two names, read by a Linear at each site."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm_a = nn.LayerNorm(16)
        self.norm_b = self.norm_a
        self.la, self.lb = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, input_ids=None):
        h = self.la(self.norm_a(self.embed(input_ids)))
        return self.lb(self.norm_b(h))


def aliased():
    torch.manual_seed(0)
    return _with_config(randomize_affine(Aliased().double()))


@pytest.mark.parametrize("options", [{}, {"exclude": ["norm_b"]}, {"filter_fn": lambda m, name: name != "norm_b"}])
def test_a_norm_registered_under_two_names_is_never_folded(options):
    """Both names chosen: functional_call left a random trial gain in the module, so the fold used it (off by 1.25)
    and even dry_run changed the weights. One name excluded: the reader at the excluded site, which keeps the
    original norm, was folded too, applying the gain and bias twice (off by 0.37)."""
    original = aliased()
    x = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in original.state_dict().items()}
    report = hf_adanorm.patch_model(original, "layernorm_simple", fold_affine=True, dry_run=True, **options)
    assert all(torch.equal(v, state[k]) for k, v in original.state_dict().items()), "dry_run changed the model"
    assert "registered under several names (norm_a, norm_b)" in str(report)
    model = copy.deepcopy(original)
    with torch.no_grad():
        before = model(input_ids=x)
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True, **options)
    assert hf_adanorm.get_patch_record(model)["fold"]["folded"] == {}
    hf_adanorm.unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x), before)


class _NormThenHead(nn.Module):
    """Embedding -> LayerNorm -> Linear head; each subclass reads the norm's output its own way."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(50, 16), nn.LayerNorm(16), nn.Linear(16, 4)


class MaskedInPlace(_NormThenHead):
    """The padding of the norm's output zeroed in place before the Linear: the probe batch has no padding."""

    def forward(self, input_ids=None):
        z = self.norm(self.embed(input_ids))
        z.masked_fill_((input_ids == 49)[..., None], 0.0)
        return self.head(z)


class FunctionalDropout(_NormThenHead):
    """F.dropout between the norm and the Linear: no autograd node in eval mode, where the probe runs."""

    def forward(self, input_ids=None):
        return self.head(F.dropout(self.norm(self.embed(input_ids)), 0.1, self.training))


class SmallDetachedRead(_NormThenHead):
    """A read the autograd graph cannot show (detached), at weight 1e-4: only the numerical check sees it."""

    def forward(self, input_ids=None):
        z = self.norm(self.embed(input_ids))
        return self.head(z) + 1e-4 * z.detach()[..., :4]


@pytest.mark.parametrize("cls, why", [(MaskedInPlace, "an in-place change"),
                                      (FunctionalDropout, "dropout (in training)"),
                                      (SmallDetachedRead, "numerical check")])
def test_reads_the_graph_does_not_show_are_refused(cls, why):
    torch.manual_seed(0)
    model = _with_config(randomize_affine(cls().double().eval()))
    report = hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, dry_run=True)
    fold_reason = next(e.reason for e in report.entries if e.name == "norm")
    assert "not foldable" in fold_reason and why in fold_reason, fold_reason


def test_a_norm_without_gain_or_bias_has_nothing_to_fold():
    model = _with_config(nn.Sequential())
    model.embed, model.norm, model.head = nn.Embedding(50, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 4)
    model.forward = lambda input_ids=None: model.head(model.norm(model.embed(input_ids)))
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    assert fold["not_foldable"]["norm"]["reason"].startswith("it has no gain or bias, so there is nothing to fold")
    assert fold["output_drift"] < 1e-6  # the swap alone keeps the function


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_image_probe_is_in_the_models_dtype(dtype):
    """A bf16 Swin failed with "Input type (float) and bias type (c10::BFloat16) should be the same"."""
    swin = build(ARCH["swin"]).to(dtype).eval()
    hf_adanorm.patch_model(swin, "layernorm_simple", fold_affine=True)
    assert hf_adanorm.get_patch_record(swin)["fold"]["folded"]


def test_a_model_the_probe_cannot_run_gets_the_probe_error():
    """CLIP's main input is input_ids, but it needs pixel_values too: a raw AttributeError before."""
    clip = build(ARCH["clip"]).eval()
    with pytest.raises(ValueError, match="fold_affine=True needs a probe batch, and CLIPModel cannot run"):
        hf_adanorm.patch_model(clip, "layernorm_simple", fold_affine=True)
    assert not hf_adanorm.is_patched(clip)


def test_a_folded_bart_reloads_with_its_embeddings_tied_by_both_loaders(tmp_path):
    """The fold unties BART's LM head with tie_word_embeddings=False, which in transformers 5 also unties the
    encoder and decoder embeddings from model.shared. The save writes them once (they are one tensor in
    memory), so both loaders initialised them at random: logits off by 0.65 on every load."""
    from transformers import AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    config = AutoConfig.for_model("bart", vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    model = randomize_affine(AutoModelForSeq2SeqLM.from_config(config).eval())
    hf_adanorm.patch_model(model, "layernorm_simple", fold_affine=True, exact_unfold=True)
    fold = hf_adanorm.get_patch_record(model)["fold"]
    assert fold["untied"] == ["lm_head"]
    assert fold["kept_ties"] == {"model.encoder.embed_tokens.weight": "model.shared.weight",
                                 "model.decoder.embed_tokens.weight": "model.shared.weight"}
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    hf_adanorm.save_pretrained(model, tmp_path / "bart")
    ours, info = hf_adanorm.from_pretrained(AutoModelForSeq2SeqLM, tmp_path / "bart", output_loading_info=True)
    remote = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bart", trust_remote_code=True)
    assert info["missing_keys"] == set()
    for loaded, tolerance in ((ours, 0.0), (remote, 1e-6)):
        shared = loaded.model.shared.weight
        assert loaded.model.encoder.embed_tokens.weight is shared and loaded.model.decoder.embed_tokens.weight is shared
        assert loaded.lm_head.weight is not shared
        with torch.no_grad():
            got = loaded.eval()(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    # unpatching the folded model gives transformers' own list of ties back with the config
    hf_adanorm.unpatch_model(model)
    assert model.config.tie_word_embeddings and "lm_head.weight" in model.all_tied_weights_keys

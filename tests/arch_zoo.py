"""The tiny random models of test_architectures.py: 30+ architectures built from their configs
(nothing from the hub), the inputs each takes, and what each one is there to show."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized
from transformers import AutoConfig, AutoModel

BATCH, SEQ, VOCAB = 2, 8, 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
DECODER = dict(TEXT, num_key_value_heads=2)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
               decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, decoder_start_token_id=1)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64)


@dataclass
class Arch:
    model_type: str
    inputs: str  # "text", "seq2seq", "image", "clip", "audio" or "whisper"
    config: dict
    rejected: tuple[str, ...] = ()  # classes that are in the model but are no last-dim norm
    id: str = ""
    has_norms: bool = True
    dtype: torch.dtype = torch.float32
    fact: tuple = ()  # (what this model is here to show, predicate(model, probed) that it holds)
    marks: tuple = ()

    def __post_init__(self):
        self.id = self.id or self.model_type

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


def _probed_with(pred):
    """Some module the probe accepted satisfies ``pred(module)``."""
    return lambda model, probed: any(pred(model.get_submodule(n)) for n in probed)


def _rejected_with(pred):
    """Some module satisfying ``pred(module)`` exists and the probe turned it down."""
    return lambda model, probed: any(pred(m) and n not in probed for n, m in model.named_modules())


def _param_names(module):
    return sorted(n for n, _ in module.named_parameters(recurse=False))


# Mamba-style models read ``norm.weight.dtype`` in forward, which a parameter-free replacement lacks.
READS_NORM_WEIGHT = pytest.mark.xfail(
    raises=AttributeError, strict=True,
    reason="modeling_mamba*.py calls self.norm(h.to(self.norm.weight.dtype)); the parameter-free "
           "replacement has no .weight")


ARCHS = [
    # encoders
    Arch("bert", "text", TEXT),
    Arch("bert", "text", TEXT, dtype=torch.bfloat16, id="bert-bf16"),
    Arch("roberta", "text", TEXT),
    Arch("xlm-roberta", "text", TEXT),
    Arch("deberta", "text", TEXT),
    Arch("deberta-v2", "text", TEXT),
    Arch("electra", "text", dict(TEXT, embedding_size=16)),
    Arch("albert", "text", dict(TEXT, embedding_size=16)),
    Arch("distilbert", "text", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                    max_position_embeddings=64, pad_token_id=0)),
    Arch("mpnet", "text", TEXT),
    Arch("esm", "text", dict(TEXT, mask_token_id=3)),
    Arch("funnel", "text", dict(vocab_size=VOCAB, block_sizes=[1, 1], d_model=32, n_head=2, d_head=16,
                                d_inner=64, architectures=["FunnelModel"])),  # None trips AutoModel
    Arch("mobilebert", "text", dict(TEXT, embedding_size=16, intra_bottleneck_size=32,
                                    true_hidden_size=32, num_feedforward_networks=1),
         rejected=("NoNorm",), has_norms=False),
    Arch("mobilebert", "text", dict(TEXT, embedding_size=16, intra_bottleneck_size=32,
                                    true_hidden_size=32, num_feedforward_networks=1,
                                    normalization_type="layer_norm"), id="mobilebert-layer-norm"),
    Arch("squeezebert", "text", dict(TEXT, embedding_size=32, q_groups=1, k_groups=1, v_groups=1,
                                     post_attention_groups=1, intermediate_groups=1, output_groups=1),
         rejected=("SqueezeBertLayerNorm",), fact=("an nn.LayerNorm subclass that transposes to channels",
                                                   _rejected_with(lambda m: isinstance(m, nn.LayerNorm)))),
    Arch("xlnet", "text", dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64)),
    # decoders
    Arch("gpt2", "text", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                              bos_token_id=1, eos_token_id=2)),
    Arch("gpt_neox", "text", dict(TEXT, rotary_pct=0.5)),
    Arch("gptj", "text", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                              rotary_dim=8, bos_token_id=1, eos_token_id=2)),
    Arch("opt", "text", dict(TEXT, ffn_dim=64, word_embed_proj_dim=32)),
    Arch("opt", "text", dict(TEXT, ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False),
         id="opt-post-ln", fact=("post-LN: no final decoder norm",
                                 lambda model, probed: model.decoder.final_layer_norm is None)),
    Arch("bloom", "text", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2,
                               bos_token_id=1, eos_token_id=2)),
    Arch("falcon", "text", dict(TEXT, num_kv_heads=2, ffn_hidden_size=64)),
    Arch("gpt_neo", "text", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                 attention_types=[[["global", "local"], 1]], window_size=4,
                                 max_position_embeddings=64)),
    Arch("falcon", "text", dict(TEXT, num_kv_heads=2, ffn_hidden_size=64, new_decoder_architecture=True,
                                num_ln_in_parallel_attn=2), id="falcon-new-decoder"),
    Arch("stablelm", "text", dict(DECODER, qk_layernorm=True, partial_rotary_factor=0.5)),
    Arch("starcoder2", "text", DECODER),
    Arch("nemotron", "text", dict(DECODER, partial_rotary_factor=0.5)),
    Arch("phi", "text", DECODER),
    Arch("phi", "text", dict(DECODER, qk_layernorm=True), id="phi-qk-layernorm"),
    Arch("llama", "text", DECODER),
    Arch("llama", "text", DECODER, dtype=torch.bfloat16, id="llama-bf16"),
    Arch("qwen2", "text", DECODER),
    Arch("qwen3", "text", dict(DECODER, head_dim=16), fact=(
        "per-head q/k RMSNorms with a 1-D weight over head_dim: last-dim RMSNorms",
        lambda model, probed: probed.get("layers.0.self_attn.q_norm") == "rmsnorm")),
    Arch("mistral", "text", DECODER),
    Arch("gemma", "text", dict(DECODER, head_dim=16)),
    Arch("gemma2", "text", dict(DECODER, head_dim=16, sliding_window=4)),
    Arch("phi3", "text", DECODER),
    Arch("olmo", "text", DECODER, fact=("a LayerNorm with no parameters at all",
                                        _probed_with(lambda m: not _param_names(m)))),
    Arch("olmo2", "text", DECODER),
    Arch("cohere", "text", DECODER, fact=("a centring LayerNorm with a weight and no bias",
                                          _probed_with(lambda m: _param_names(m) == ["weight"]))),
    Arch("cohere", "text", dict(DECODER, use_qk_norm=True), id="cohere-qk-norm",
         rejected=("CohereLayerNorm",), fact=("per-head q/k LayerNorms with a 2-D weight",
                                              _rejected_with(lambda m: getattr(m, "weight", None) is not None
                                                             and m.weight.dim() == 2))),
    Arch("mpt", "text", dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64),
         fact=("nn.LayerNorms whose bias was set to None",
               _probed_with(lambda m: isinstance(m, nn.LayerNorm) and m.bias is None))),
    Arch("imagegpt", "text", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64),
         fact=("ImageGPTLayerNorm, which does not centre: an RMSNorm",
               lambda model, probed: set(probed.values()) == {"rmsnorm"})),
    Arch("mamba", "text", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                               intermediate_size=64, time_step_rank=4),
         marks=READS_NORM_WEIGHT),
    Arch("mamba2", "text", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                                num_heads=4, head_dim=16, n_groups=1, expand=2, chunk_size=8),
         rejected=("MambaRMSNormGated",), marks=READS_NORM_WEIGHT),
    # encoder-decoders
    Arch("t5", "seq2seq", dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                               num_heads=2, decoder_start_token_id=0)),
    Arch("bart", "seq2seq", SEQ2SEQ),
    Arch("mbart", "seq2seq", SEQ2SEQ),
    Arch("marian", "seq2seq", dict(SEQ2SEQ, decoder_vocab_size=VOCAB)),
    Arch("whisper", "whisper", dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=16,
                                    max_target_positions=32, begin_suppress_tokens=None)),
    # vision
    Arch("vit", "image", VISION),
    Arch("deit", "image", VISION),
    Arch("dinov2", "image", dict(VISION, mlp_ratio=2)),
    Arch("segformer", "image", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                    hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                    num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                    decoder_hidden_size=32)),
    Arch("swin", "image", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                               num_heads=[2, 2], window_size=4)),
    Arch("convnext", "image", dict(image_size=32, num_channels=3, hidden_sizes=[16, 32],
                                   depths=[1, 1], num_stages=2),
         rejected=("ConvNextLayerNorm",), fact=("channels-first norms that subclass nn.LayerNorm",
                                                _rejected_with(lambda m: isinstance(m, nn.LayerNorm)))),
    Arch("convnextv2", "image", dict(image_size=32, num_channels=3, hidden_sizes=[16, 32],
                                     depths=[1, 1], num_stages=2),
         rejected=("ConvNextV2LayerNorm", "ConvNextV2GRN")),
    Arch("resnet", "image", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
         rejected=("BatchNorm2d",), has_norms=False),
    Arch("clip", "clip", dict(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        vision_config=VISION, projection_dim=16)),
    # audio
    Arch("wav2vec2", "audio", dict(TEXT, conv_dim=[16, 16], conv_stride=[5, 4], conv_kernel=[10, 4],
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
         rejected=("GroupNorm", "_WeightNorm"), fact=("a weight-norm parametrized positional conv",
                                                      lambda model, probed: is_parametrized(
                                                          model.encoder.pos_conv_embed.conv))),
    Arch("hubert", "audio", dict(TEXT, conv_dim=[16, 16], conv_stride=[5, 4], conv_kernel=[10, 4],
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                 feat_extract_norm="layer", do_stable_layer_norm=True)),
]




def build(arch: Arch) -> nn.Module:
    config = AutoConfig.for_model(arch.model_type, **arch.config)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModel.from_config(config)
    return model.to(arch.dtype).eval()


def make_inputs(arch: Arch, model: nn.Module) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    image_size = getattr(getattr(model.config, "vision_config", model.config), "image_size", 32)
    pixels = torch.randn(BATCH, 3, image_size, image_size, generator=gen).to(arch.dtype)
    if arch.inputs == "text":
        return {"input_ids": ids}
    if arch.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if arch.inputs == "image":
        return {"pixel_values": pixels}
    if arch.inputs == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    if arch.inputs == "audio":
        return {"input_values": torch.randn(BATCH, 1600, generator=gen)}
    if arch.inputs == "whisper":
        cfg = model.config
        feats = torch.randn(BATCH, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen)
        return {"input_features": feats, "decoder_input_ids": ids[:, :5]}
    raise ValueError(arch.inputs)


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return [t for item in getattr(out, "to_tuple", lambda: ())() for t in output_tensors(item)]


def run(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(**inputs))

"""Tokenizer and model for a run: pretrained, or built from a config for from-scratch training.

The norm swap (``hf_adanorm.patch_model``) happens here, on the plain model,
before ``accelerator.prepare`` wraps it (DDP/FSDP/DeepSpeed must see the final
set of parameters).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from ..patch import get_patch_record, patch_model
from .args import BUILT_TOKENIZERS

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
CONFIG_PREFIX = "config:"


def build_vocab_tokenizer(texts, level: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is every character ('char') or every
    whitespace-separated word ('word') of ``texts``; unseen ones map to [UNK]."""
    split = (pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated") if level == "char"
             else pre_tokenizers.WhitespaceSplit())
    symbols = set()
    for text in texts:
        symbols.update(piece for piece, _ in split.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for symbol in sorted(symbols):
        vocab.setdefault(symbol, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def load_tokenizer(args, train_texts):
    if args.tokenizer in BUILT_TOKENIZERS:
        return build_vocab_tokenizer(train_texts, args.tokenizer)
    source = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ValueError(f"cannot load a tokenizer from {source!r} ({type(err).__name__}: {err}); pass "
                         "--tokenizer with a hub id or folder, or 'char' / 'word'") from err
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(args, auto_class, tokenizer, **config_kwargs):
    """``auto_class`` (e.g. AutoModelForCausalLM) from args.model, with args.model_config
    overrides; 'config:<type>' builds it randomly initialised, sized to the tokenizer."""
    overrides = {**(args.model_config or {}), **config_kwargs}
    try:
        if args.model.startswith(CONFIG_PREFIX):
            config = AutoConfig.for_model(args.model[len(CONFIG_PREFIX):], **overrides)
            config.vocab_size = len(tokenizer)
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                setattr(config, name, getattr(tokenizer, name))
            model = auto_class.from_config(config)
        else:
            model = auto_class.from_pretrained(args.model, **overrides)
    except Exception as err:
        raise ValueError(f"cannot load model {args.model!r} as {auto_class.__name__} ({type(err).__name__}: "
                         f"{err}); pass a hub id, a local model folder or 'config:<model_type>'") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {args.model!r} only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings: use the model's tokenizer")
    return model


def apply_norm(model, args):
    """Swap the norms (no-op for the LayerNorm baseline); returns the PatchReport or None."""
    config = args.norm_config()
    return None if config is None else patch_model(model, config)


def fold_outcome(model):
    """What ``fold_affine`` did to the patched model (the patch record's ``fold``: which norms
    were folded into which Linear layers, which were not foldable and why, the output drift),
    or None when it was not asked for."""
    record = get_patch_record(model)
    return None if record is None else record.get("fold")


def unfolded_warning(fold) -> str:
    """The warning for a run whose norms could not all be folded ('' when all were):
    those norms train without their gain and bias, changing a pretrained model's function."""
    if not fold or not fold["not_foldable"]:
        return ""
    names = sorted(fold["not_foldable"])
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    drift = fold.get("output_drift")
    return (f"fold_affine: {len(names)} of {len(names) + len(fold['folded'])} norms are not foldable "
            f"({shown}; {names[0]}: {fold['not_foldable'][names[0]]['reason']}), so they train without a gain and "
            f"bias; patching changed the model's output by {drift:.3g} (relative L2 on a probe batch). "
            "Typical of post-LN models (BERT, BART); see 'fold' in run_config.json and metrics.json.")

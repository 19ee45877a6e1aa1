"""Tokenizer and model for a run: pretrained, or built from a config for from-scratch training.

The norm swap (``hf_adanorm.patch_model``) happens here, on the plain model,
before ``accelerator.prepare`` wraps it (DDP/FSDP/DeepSpeed must see the final
set of parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, PreTrainedTokenizerFast

from ..checkpoint import load_tokenizer as load_checkpoint_tokenizer
from ..patch import get_patch_record, is_patched, patch_model
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
    # A pair (--text_pair_column) gets [EOS] between its texts: without it ('a b', 'c d e') and
    # ('a b c', 'd e') are one and the same input. A single text is left as it is.
    eos = SPECIAL_TOKENS["eos_token"]
    backend.post_processor = processors.TemplateProcessing(single="$A", pair=f"$A {eos} $B:1",
                                                           special_tokens=[(eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def text_separator(tokenizer) -> str:
    """What joins two texts (paragraphs of a novel) into one stream of tokens for a causal LM: a blank line
    for a character-level vocabulary that has the newline (every token but the special ones one character
    long: the recipe's 'char' tokenizer, built or saved), so that the model reads the text as written; else
    the EOS token where the tokenizer has one as a single token (GPT-2's convention; a word vocabulary, which
    has no newline); else a blank line. The recipe and hf-adanorm convert both take it from here: a model
    must be trained, distilled and evaluated on the same kind of stream, or its loss counts a token it never
    saw."""
    special, vocab = set(tokenizer.all_special_tokens), tokenizer.get_vocab()
    if "\n" in vocab and all(len(token) == 1 for token in vocab if token not in special):
        return "\n\n"
    eos = tokenizer.eos_token
    if eos and len(tokenizer(eos, add_special_tokens=False)["input_ids"]) == 1:
        return eos
    return "\n\n"


def load_tokenizer(args, train_texts):
    if args.tokenizer in BUILT_TOKENIZERS:
        return build_vocab_tokenizer(train_texts, args.tokenizer)
    source = args.tokenizer or args.model
    try:
        tokenizer = load_checkpoint_tokenizer(source)  # a converted model's too, without a remote-code prompt
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
        elif converted_record(args.model) is not None:
            model = _load_converted(args, auto_class, overrides)
        else:
            model = auto_class.from_pretrained(args.model, **overrides)
    except ValueError as err:
        if "hf_adanorm" in str(err):  # our own refusal: already says what to do
            raise
        raise ValueError(f"cannot load model {args.model!r} as {auto_class.__name__} ({type(err).__name__}: "
                         f"{err}); pass a hub id, a local model folder or 'config:<model_type>'") from err
    except Exception as err:
        raise ValueError(f"cannot load model {args.model!r} as {auto_class.__name__} ({type(err).__name__}: "
                         f"{err}); pass a hub id, a local model folder or 'config:<model_type>'") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {args.model!r} only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings: use the model's tokenizer")
    return model


def converted_record(model_name: str):
    """The hf_adanorm patch record of a local checkpoint folder (e.g. from ``hf-adanorm convert``),
    or None for any other model."""
    config_file = Path(model_name).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("hf_adanorm")
    except (OSError, ValueError):
        return None


# The options that make two patches compute different functions (include/exclude/fold_affine
# only choose what a conversion already did).
_FUNCTION_OPTIONS = ("norm", "k", "C", "detach", "eps", "eps_mode")


def _load_converted(args, auto_class, overrides):
    """A checkpoint whose norms are already swapped: train it with the norm it holds, or refuse."""
    from ..checkpoint import from_pretrained, load_config
    from ..registry import get_spec

    saved = converted_record(args.model)["config"]
    if args.norm_config() is None:
        raise ValueError(
            f"hf_adanorm: {args.model!r} holds a model converted to {saved['norm']!r}: it has no LayerNorms "
            f"left to train as the 'layernorm' baseline. Pass --norm {saved['norm']} to fine-tune it, or the "
            "original pretrained model for the baseline")
    wanted = args.norm_config().to_dict()
    relevant = [n for n in _FUNCTION_OPTIONS if n in ("norm", "eps", "eps_mode") or n in get_spec(saved["norm"]).options]
    differ = [f"{n}={wanted.get(n)!r} (the checkpoint's: {saved.get(n)!r})" for n in relevant
              if n in saved and wanted.get(n) != saved.get(n) and not (n == "eps" and wanted.get(n) is None)]
    if differ:
        raise ValueError(f"hf_adanorm: {args.model!r} was converted with other norm options than asked for: "
                         f"{'; '.join(differ)}. Pass the checkpoint's options, or convert the original "
                         "model again with the ones you want")
    config = load_config(args.model, **overrides)  # e.g. num_labels of a new head
    return from_pretrained(auto_class, args.model, config=config)


def apply_norm(model, args):
    """Swap the norms (no-op for the LayerNorm baseline and for a checkpoint converted to the
    asked-for norm, which arrives patched); returns the PatchReport or None."""
    config = args.norm_config()
    if config is None or is_patched(model):
        return None
    return patch_model(model, config)


def fold_outcome(model, args=None):
    """What ``fold_affine`` did to the patched model (the patch record's ``fold``: which norms
    were folded into which Linear layers, which were not foldable and why, the output drift),
    or None when this run did not ask for it (a converted checkpoint's record keeps the fold its
    conversion made, whose drift the conversion then trained away)."""
    record = get_patch_record(model)
    if record is None or (args is not None and not args.fold_affine):
        return None
    return record.get("fold")


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

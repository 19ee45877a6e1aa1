"""The embedded default comparison: scikit-learn's handwritten digits, a tiny BERT from a config.

Needs no network and no files beyond the installed packages.  Each 8x8 digit image
(intensities 0..16) becomes a 64-word "sentence" of its pixel intensities read row by
row, e.g. ``"0 0 5 13 9 1 0 0 0 0 13 ..."``; a word-level tokenizer maps each of the 17
intensities to its own token, and BERT's position embeddings carry the pixel position.
The sweep then sees ordinary local CSV files and an ordinary model folder, exactly as a
user's own data and checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path

DIGITS_SPLITS = ("train", "validation", "test")
PIXEL_WORDS = [str(v) for v in range(17)]  # load_digits intensities are the integers 0..16
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]

# The tiny architecture: 2 layers, hidden 64 -> 5 LayerNorms to swap, ~70k parameters.
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=80, type_vocab_size=1)

# Training options of the default sweep (fields of hf_adanorm.training.TrainingArgs).
# Chosen so that 9 runs finish in a few minutes on 2 CPU cores; a from-scratch model
# wants a larger learning rate than fine-tuning would.
DEFAULT_TRAINING = dict(task="classification", text_column="text", label_column="label",
                        num_epochs=6, per_device_batch_size=32, learning_rate=2e-3, max_length=66)
DEFAULT_NORMS = ("layernorm", "layernorm_simple", "adanorm")
DEFAULT_SEEDS = (0, 1, 2)


def write_digits_csv(folder: str | Path) -> dict[str, str]:
    """Write load_digits as ``{train,validation,test}.csv`` (columns ``text,label``).

    A stratified 70/15/15 split with a fixed random_state, so every sweep and every
    machine sees the same split.  Returns {split: path}.
    """
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    folder = Path(folder)
    paths = {split: folder / f"{split}.csv" for split in DIGITS_SPLITS}
    if all(p.exists() for p in paths.values()):
        return {split: str(p) for split, p in paths.items()}
    digits = load_digits()
    text = [" ".join(str(int(v)) for v in row) for row in digits.data]
    frame = pd.DataFrame({"text": text, "label": digits.target})
    train, held_out = train_test_split(frame, test_size=0.3, stratify=frame.label, random_state=0)
    validation, test = train_test_split(held_out, test_size=0.5, stratify=held_out.label,
                                        random_state=0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in zip(DIGITS_SPLITS, (train, validation, test)):
        part.to_csv(paths[split], index=False)
    return {split: str(p) for split, p in paths.items()}


def digits_tokenizer():
    """A word-level fast tokenizer over the 17 pixel intensities, with BERT's [CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + PIXEL_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=66)


def digits_model_config():
    """The tiny BERT's config (10 labels, the tokenizer's vocabulary)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(PIXEL_WORDS), num_labels=10,
                      pad_token_id=0, **TINY_BERT)

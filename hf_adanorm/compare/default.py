"""The embedded default comparison: scikit-learn's handwritten digits, a tiny BERT from a config.

Needs no network and no files beyond the installed packages.  Each 8x8 digit image
becomes a sentence of 8 words, one per pixel row, each word the row's pixels thresholded
at half intensity (value >= 8 of 0..16), e.g. a zero reads
``"00111100 01100110 11000011 ..."``.  The training code's word-level tokenizer
(``tokenizer="word"``) gives each row pattern seen in training its own token, and BERT's
position embeddings say which row it is.  (One token per pixel, 64 of them, costs 8x the
sequence and in our trials reached about 26% validation accuracy after 6 epochs, against
about 89% for rows after 10.)  The digits are written as ordinary CSV files, so the runs
take exactly the code path of a user's own data.
"""

from __future__ import annotations

from pathlib import Path

DIGITS_SPLITS = ("train", "validation", "test")

# The tiny architecture, built from a config: 2 layers, hidden 64 -> 5 LayerNorms to swap.
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=16, type_vocab_size=1)

# Training options of the default sweep (fields of hf_adanorm.training.TrainingArgs), chosen
# so that 9 runs finish in a few minutes on 2 CPU cores.  A from-scratch model wants a
# larger learning rate than fine-tuning would.
DEFAULT_TRAINING = dict(task="classification", model="config:bert", model_config=TINY_BERT,
                        tokenizer="word", text_column="text", label_column="label",
                        num_epochs=10, per_device_batch_size=32, learning_rate=3e-3, max_length=8,
                        save_model=False)
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
    bits = digits.images >= 8  # (n, 8, 8) booleans
    text = [" ".join("".join("1" if b else "0" for b in row) for row in image) for image in bits]
    frame = pd.DataFrame({"text": text, "label": digits.target})
    train, held_out = train_test_split(frame, test_size=0.3, stratify=frame.label, random_state=0)
    validation, test = train_test_split(held_out, test_size=0.5, stratify=held_out.label,
                                        random_state=0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in zip(DIGITS_SPLITS, (train, validation, test)):
        part.to_csv(paths[split], index=False)
    return {split: str(p) for split, p in paths.items()}


def default_setup(output_dir: str | Path) -> dict:
    """The shared training options of the default sweep; write_digits_csv(setup["dataset"]) makes its data."""
    return dict(DEFAULT_TRAINING, dataset=str(Path(output_dir) / "data"))

"""The embedded default comparison: scikit-learn's handwritten digits, a tiny BERT from a config.

Needs no network and no files beyond the installed packages.  Each 8x8 digit image
(intensities 0..16) becomes a 64-word "sentence" of its pixel intensities read row by
row, e.g. ``"0 0 5 13 9 1 0 0 0 0 13 ..."``; the training code's word-level tokenizer
(``tokenizer="word"``) gives each of the 17 intensities its own token, and BERT's
position embeddings carry the pixel position.  The digits are written as ordinary CSV
files, so the runs go through exactly the code path a user's own local data takes.
"""

from __future__ import annotations

from pathlib import Path

DIGITS_SPLITS = ("train", "validation", "test")

# The tiny architecture, built from a config: 2 layers, hidden 64 -> 5 LayerNorms to swap.
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=80, type_vocab_size=1)

# Training options of the default sweep (fields of hf_adanorm.training.TrainingArgs), chosen
# so that 9 runs finish in a few minutes on 2 CPU cores.  A from-scratch model wants a
# larger learning rate than fine-tuning would; max_length 66 = 64 pixels + [CLS] + [SEP].
DEFAULT_TRAINING = dict(task="classification", model="config:bert", model_config=TINY_BERT,
                        tokenizer="word", text_column="text", label_column="label",
                        num_epochs=6, per_device_batch_size=32, learning_rate=2e-3, max_length=66,
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
    text = [" ".join(str(int(v)) for v in row) for row in digits.data]
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

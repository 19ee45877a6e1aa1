"""The unlabeled text of a conversion, tokenized for the teacher's tokenizer.

Encoders see one example per text, truncated to ``max_length`` tokens and padded per
batch; causal LMs see blocks of ``max_length`` tokens cut from the concatenated text, as
the causal-LM recipe makes them. Every way the text can be unusable is an error here,
before a model is built or a file is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, default_data_collator

from ..checkpoint import load_tokenizer as load_checkpoint_tokenizer
from ..training.causal_lm import group_texts
from ..training.data import check_columns, load_raw_datasets
from ..training.modeling import text_separator


class _DataOptions:
    """The fields ``load_raw_datasets`` reads, from ConvertArgs (no training-sample limit)."""

    def __init__(self, args):
        self.dataset, self.dataset_config = args.dataset, args.dataset_config
        self.validation_fraction, self.split_seed = args.validation_fraction, args.split_seed
        self.max_train_samples, self.max_eval_samples = None, None


def load_tokenizer(args):
    source = args.tokenizer or args.model
    try:
        tokenizer = load_checkpoint_tokenizer(source)
    except Exception as err:  # transformers raises many types; all mean "no usable tokenizer there"
        raise ValueError(f"cannot load a tokenizer from {source!r} ({type(err).__name__}: {err}); "
                         "pass --tokenizer with the model's tokenizer") from err
    if tokenizer.pad_token is None:  # GPT-2-style: pad with EOS (masked out)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eval_files(path: str) -> list[str]:
    """The files of ``--eval_dataset`` that are read: the file, or the test (else validation, else every)
    split of a folder."""
    from ..training.data import local_data_files
    by_split = local_data_files(Path(path).expanduser())
    return next(by_split[s] for s in ("test", "validation", "train") if s in by_split)


def eval_text(path: str, causal: bool):
    """:func:`eval_files` as one Dataset."""
    import datasets

    from ..training.data import _builder
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"eval_dataset {path!r} does not exist: pass a local text/csv/json file or folder")
    files = eval_files(path)
    builder = _builder([Path(f) for f in files])
    kwargs = {"sample_by": "paragraph" if causal else "line"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, **kwargs)["train"]


def _non_empty(texts) -> list[str]:
    return [t for t in texts if isinstance(t, str) and t.strip()]


def load_texts(args, causal: bool) -> dict:
    """{'train': texts, 'validation': texts} with blank and missing texts dropped."""
    try:
        raw = load_raw_datasets(_DataOptions(args), text_sample_by="paragraph" if causal else "line")
    except ValueError as err:
        if "resulting train set will be empty" not in str(err) and "test_size" not in str(err):
            raise
        unit = "paragraphs (blocks of text between blank lines)" if causal else "texts"
        raise ValueError(f"{args.dataset!r} holds too few {unit} to hold out validation_fraction="
                         f"{args.validation_fraction} of them for measuring the drift: give more text, or "
                         "a folder with train.* and validation.* files") from None
    check_columns(raw, [args.text_column])
    texts = {split: _non_empty(raw[split][args.text_column]) for split in ("train", "validation")}
    if args.eval_dataset is not None:
        data = eval_text(args.eval_dataset, causal)
        check_columns({"evaluation": data}, [args.text_column])
        texts["validation"] = _non_empty(data[args.text_column])
    for split, found in texts.items():
        if not found:
            source = ("--eval_dataset", args.eval_dataset) if split == "validation" and args.eval_dataset else (
                "--dataset", args.dataset)
            raise ValueError(f"the {split} text of {source[0]} {source[1]!r} is empty (column "
                             f"{args.text_column!r} holds no non-blank text): give it text to "
                             f"{'measure the drift on' if split == 'validation' else 'distil on'}")
    return texts


def tokenize(texts: dict, tokenizer, args, causal: bool, vocab_size: int) -> dict:
    """Tokenized splits: lists of dicts with input_ids (and attention_mask for encoders)."""
    from datasets import Dataset

    out = {}
    for split, found in texts.items():
        data = Dataset.from_dict({"text": found})
        if causal:
            sep = text_separator(tokenizer)  # as the recipe that trained it
            data = data.map(lambda b: tokenizer([t + sep for t in b["text"]], add_special_tokens=False),
                            batched=True, remove_columns=["text"])
            data = group_texts(data, args.max_length)
            if len(data) == 0 or "labels" not in data.column_names:  # a text shorter than a block: no column
                raise ValueError(f"the {split} text holds fewer than max_length={args.max_length} tokens: "
                                 "lower --max_length or give more text")
            data = data.remove_columns(["labels"])
        else:
            data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                            batched=True, remove_columns=["text"])
        largest = max(max(ids) for ids in data["input_ids"] if ids)
        if largest >= vocab_size:
            raise ValueError(f"the tokenizer makes token id {largest}, but the model has only {vocab_size} "
                             "embeddings: pass the model's own tokenizer (--tokenizer)")
        out[split] = data
    if "validation" in out and args.max_eval_samples:
        out["validation"] = out["validation"].select(range(min(args.max_eval_samples, len(out["validation"]))))
    return out


def collator(tokenizer, causal: bool):
    if causal:
        def collate(features):
            batch = default_data_collator(features)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            return batch
        return collate
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")

"""Causal language modelling: train (from a config) or fine-tune any AutoModelForCausalLM.

The text is tokenized, concatenated per group of ``GROUP_SIZE`` examples and cut into
blocks of ``max_length`` tokens (the remainder of each group is dropped), as transformers'
``run_clm`` does: memory stays bounded by a group however large the corpus. Metrics over
the evaluation blocks, every block having the same number T − 1 of predicted tokens:

    loss = mean over blocks and positions of −ln p(x_t | x_<t)      (nats per token)
    perplexity = exp(loss)
    bpc = loss / ln 2   (bits per character; only with --tokenizer char, where a token is a character)
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM, default_data_collator

from .args import TrainingArgs
from .data import load_raw_datasets
from .loop import Task, train
from .modeling import apply_norm, load_model, load_tokenizer, text_separator

GROUP_SIZE = 1000  # examples concatenated at a time; blocks may straddle examples within a group


def _blocks(tokenized, block_size: int) -> dict:
    ids = list(chain.from_iterable(tokenized["input_ids"]))
    usable = len(ids) // block_size * block_size
    blocks = [ids[i:i + block_size] for i in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def group_texts(tokenized: Dataset, block_size: int) -> Dataset:
    """Blocks of ``block_size`` tokens (labels = input_ids), from ``GROUP_SIZE`` examples at a time."""
    return tokenized.map(_blocks, batched=True, batch_size=GROUP_SIZE, fn_kwargs={"block_size": block_size},
                         remove_columns=tokenized.column_names)


def build_task(args: TrainingArgs) -> Task:
    # paragraphs keep a novel's sentences together when a hold-out split is cut
    raw = load_raw_datasets(args, text_sample_by="paragraph", columns=[args.text_column])
    tokenizer = load_tokenizer(args, raw["train"][args.text_column])
    separator = text_separator(tokenizer)

    def tokenize(batch):
        return tokenizer([text + separator for text in batch[args.text_column]], add_special_tokens=False)

    splits = {}
    for name, data in raw.items():
        if name not in ("train", "validation", "test"):
            continue
        tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names)
        splits[name] = group_texts(tokenized, args.max_length)
        if len(splits[name]) == 0:
            raise ValueError(f"split {name!r} holds fewer than max_length={args.max_length} tokens: "
                             "lower --max_length or give more text")

    model = load_model(args, AutoModelForCausalLM, tokenizer)
    check_causal(model, args.model)
    report = apply_norm(model, args)
    char_level = args.tokenizer == "char"
    return Task(model=model, tokenizer=tokenizer, splits=splits, collate_fn=default_data_collator,
                eval_step=eval_step, compute_metrics=lambda arrays: compute_metrics(arrays, char_level),
                patch_report=report, info={"vocab_size": len(tokenizer), "char_level": char_level,
                                           "train_tokens": len(splits["train"]) * args.max_length})


def check_causal(model, name: str, length: int = 8) -> None:
    """Refuse a model whose prediction at a position changes with a later token: trained as a language
    model it would read the answer (an encoder such as BERT built by AutoModelForCausalLM without
    is_decoder=True: its loss falls to nothing, and any comparison of norms on it is meaningless)."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: the run's own draws stay as they were
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, length), generator=generator)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.get_input_embeddings().num_embeddings
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before, after = (model(input_ids=x).logits[0, :-1].float() for x in (ids, changed))
    model.train(was_training)
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max())):
        raise ValueError(f"{name!r} is not a causal language model: its predictions depend on later tokens, so "
                         "trained on next-token prediction it would read the answer. For an encoder such as BERT "
                         "pass --model_config '{\"is_decoder\": true}' (causal attention), or use a decoder model")


def eval_step(model, batch) -> dict:
    logits = model(input_ids=batch["input_ids"]).logits.float()
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    return {"loss": token_loss.mean(-1)}  # per block; blocks have equal length, so the mean is exact


def compute_metrics(arrays: dict, char_level: bool) -> dict:
    loss = float(np.mean(arrays["loss"]))
    try:
        perplexity = math.exp(loss)
    except OverflowError:  # a diverged run's mean loss can be finite and past 709.78: inf, not a crash
        perplexity = math.inf
    metrics = {"loss": loss, "perplexity": perplexity}
    if char_level:
        metrics["bpc"] = loss / math.log(2)
    return metrics


def training_function(args: TrainingArgs) -> dict:
    """Train and evaluate; returns what is written to ``metrics.json``."""
    return train(args, build_task).metrics

"""Sequence classification: fine-tune (or train) any AutoModelForSequenceClassification.

Metrics are accuracy and macro-F1 from scikit-learn (offline; ``evaluate.load("accuracy")``
fetches its script from the hub), and any ``--eval_metrics`` from ``evaluate``. Two diagnostics
come with them, for the comparison report: ``majority_accuracy``, the accuracy of always
predicting train's most frequent class (what a model that learned nothing but the class balance
scores), and ``predicted_classes``, how many distinct classes the model predicted (1: it
predicts a single class, whatever the input).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from .args import TrainingArgs
from .data import load_raw_datasets
from .eval_metrics import compute_eval_metrics, load_eval_metrics
from .loop import Task, train
from .modeling import apply_norm, load_model, load_tokenizer


def _label_names(raw, label_column: str) -> list:
    feature = raw["train"].features[label_column]
    if hasattr(feature, "names"):  # a ClassLabel already
        return list(feature.names)
    return sorted(set(raw["train"][label_column]))


def build_task(args: TrainingArgs) -> Task:
    text_columns = [args.text_column] + ([args.text_pair_column] if args.text_pair_column else [])
    raw = load_raw_datasets(args, text_sample_by="line", columns=text_columns + [args.label_column],
                            label_column=args.label_column)
    labels = _label_names(raw, args.label_column)
    if len(labels) < 2:
        raise ValueError(f"column {args.label_column!r} holds {len(labels)} distinct value(s) in train; "
                         "classification needs at least 2")
    # a ClassLabel column holds the class ids already; other columns hold the labels themselves
    is_class_label = hasattr(raw["train"].features[args.label_column], "names")
    label_ids = {(i if is_class_label else label): i for i, label in enumerate(labels)}
    majority = label_ids[Counter(raw["train"][args.label_column]).most_common(1)[0][0]]
    if "test" in raw:
        unknown = sorted({y for y in raw["test"][args.label_column] if y not in label_ids}, key=str)
        if unknown and all(y not in label_ids for y in raw["test"][args.label_column]):
            raw.pop("test")  # hidden test labels (e.g. GLUE's -1): nothing to score against
        elif unknown:  # a typo or a class train lacks: scoring the rest would be another test set
            raise ValueError(f"test labels {unknown[:5]} never occur in train ({labels[:10]}); an unlabelled test "
                             "split (every label hidden) is dropped, a partly unknown one is refused")
    unknown = set(raw["validation"][args.label_column]) - set(label_ids)
    if unknown:
        raise ValueError(f"validation labels {sorted(unknown)[:5]} never occur in train ({labels[:10]})")

    # a built vocabulary covers every text column: words only in the pair column are not [UNK]
    tokenizer = load_tokenizer(args, [text for column in text_columns for text in raw["train"][column]])

    def encode(batch):
        texts = [batch[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=args.max_length)
        encoded["labels"] = [label_ids[y] for y in batch[args.label_column]]
        return encoded

    splits = {name: data.map(encode, batched=True, remove_columns=data.column_names)
              for name, data in raw.items() if name in ("train", "validation", "test")}

    extra = load_eval_metrics(args.eval_metrics)
    model = load_model(args, AutoModelForSequenceClassification, tokenizer, num_labels=len(labels))
    report = apply_norm(model, args)
    return Task(model=model, tokenizer=tokenizer, splits=splits,
                collate_fn=DataCollatorWithPadding(tokenizer), eval_step=eval_step,
                compute_metrics=lambda arrays: compute_metrics(arrays, majority, extra), patch_report=report,
                info={"labels": [str(label) for label in labels]})


def eval_step(model, batch) -> dict:
    logits = model(**batch).logits.float()
    return {"loss": F.cross_entropy(logits, batch["labels"], reduction="none"),
            "prediction": logits.argmax(-1), "label": batch["labels"]}


def compute_metrics(arrays: dict, majority_class: int, eval_metrics: dict | None = None) -> dict:
    y, p = arrays["label"].astype(np.int64), arrays["prediction"].astype(np.int64)
    metrics = {"loss": float(arrays["loss"].mean()), "accuracy": float(accuracy_score(y, p)),
               # over the classes of the labels, the same for every run: scikit-learn's default adds the
               # classes a run predicts, so one stray prediction of an absent class would change the average
               "f1": float(f1_score(y, p, average="macro", labels=np.unique(y))),
               "majority_accuracy": float(np.mean(y == majority_class)),
               "predicted_classes": int(len(np.unique(p)))}
    return {**metrics, **compute_eval_metrics(eval_metrics or {}, y, p, taken=metrics)}


def training_function(args: TrainingArgs) -> dict:
    """Train and evaluate; returns what is written to ``metrics.json``."""
    return train(args, build_task).metrics


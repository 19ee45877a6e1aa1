"""Labelled accuracy of a converted sequence classifier against its original: docs/conversion.md.

    python benchmarks/classifier_conversion.py OUT/model --data ../shared/data/rt-polarity/test.csv

The original is the teacher named in OUT/conversion.json. Prints each model's accuracy on the csv's
``text`` / ``label`` columns and the share of its sentences on which the two predict the same class.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

import hf_adanorm


def predict(model, tokenizer, texts, max_length: int, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            out.append(model(**batch).logits.argmax(-1))
    return torch.cat(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a converted classifier (OUT/model of hf-adanorm convert)")
    parser.add_argument("--data", required=True, help="a csv with 'text' and 'label' columns")
    parser.add_argument("--max_length", type=int, default=64)
    args = parser.parse_args()
    with open(args.data, newline="") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [r["text"] for r in rows], torch.tensor([int(r["label"]) for r in rows])
    teacher_path = json.loads((Path(args.model).parent / "conversion.json").read_text())["teacher"]
    tokenizer = hf_adanorm.load_tokenizer(args.model)
    original = predict(AutoModelForSequenceClassification.from_pretrained(teacher_path), tokenizer, texts,
                       args.max_length)
    converted = predict(hf_adanorm.from_pretrained(AutoModelForSequenceClassification, args.model), tokenizer,
                        texts, args.max_length)
    print(f"{len(labels)} texts: original accuracy {(original == labels).float().mean():.4f}, converted "
          f"{(converted == labels).float().mean():.4f}, same prediction {(original == converted).float().mean():.4f}")


if __name__ == "__main__":
    main()

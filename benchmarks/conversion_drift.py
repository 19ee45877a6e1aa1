"""Drift of a converted model from its original on any text: the figures of docs/conversion.md.

    python benchmarks/conversion_drift.py OUT/model --text ../shared/data/rt-polarity/test.csv \
        --text ../shared/data/austen/persuasion.txt --max_texts 256

For each text file: the mean-pooled embedding cosine and the relative error of the last hidden
state (encoders), or KL and next-token loss (causal LMs), of the converted model against the model
named as the teacher in OUT/conversion.json, on the first --max_texts non-blank texts (csv: the
'text' column; txt: one text per non-blank line, or per paragraph for causal LMs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoModelForCausalLM

import hf_adanorm
from hf_adanorm.convert.data import collator, eval_text
from hf_adanorm.convert.loop import measure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a converted model folder (OUT/model of hf-adanorm convert)")
    parser.add_argument("--text", action="append", required=True, help="a csv/txt file (repeatable)")
    parser.add_argument("--max_texts", type=int, default=256)
    parser.add_argument("--max_length", type=int, default=64)
    args = parser.parse_args()
    result = json.loads((Path(args.model).parent / "conversion.json").read_text())
    causal = result["objective"] == "logits"
    auto = AutoModelForCausalLM if causal else AutoModel
    teacher = auto.from_pretrained(result["teacher"]).eval()
    student = hf_adanorm.from_pretrained(auto, args.model).eval()
    tokenizer = hf_adanorm.load_tokenizer(args.model)  # no remote-code prompt (the folder names the model's code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = {}
    for path in args.text:
        texts = [t for t in eval_text(path, causal)["text"] if isinstance(t, str) and t.strip()][:args.max_texts]
        encoded = [tokenizer(t, truncation=True, max_length=args.max_length) for t in texts]
        loader = DataLoader(encoded, batch_size=32, collate_fn=collator(tokenizer, causal=False))
        figures = measure(student, teacher, loader, torch.device("cpu"), causal=causal)
        rows[path] = {k: v for k, v in figures.items() if k != "layer_cosine"}
        print(path, json.dumps(rows[path]))
    return rows


if __name__ == "__main__":
    main()

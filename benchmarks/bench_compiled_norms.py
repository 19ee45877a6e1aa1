"""Inside ``torch.compile``: the norms as hf_adanorm's kernels (one op) or as traced math.

Each norm is compiled (``fullgraph=True``) inside a small function with a neighbouring
element-wise op, ``norm(x) * 1.5 + 0.1``, as in a model, where inductor can fuse traced math
with its neighbours but not with an opaque op. Forward + backward is timed (median of
``--repeats``) once with ``HF_ADANORM_COMPILED_NORMS=kernels`` and once with ``math``; the
ratio math / kernels below 1 means the traced math is faster. This is the measurement behind
the "auto" choice of hf_adanorm/functional.py (math for CPU tensors).

    python benchmarks/bench_compiled_norms.py
    python benchmarks/bench_compiled_norms.py --device cuda --shapes 8192x768 16384x4096
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine_line, write_csv

import hf_adanorm
from hf_adanorm import functional

VARIANTS = {"layernorm_simple": ("layernorm_simple", {}), "adanorm": ("adanorm", {}),
            "detachnorm_mean": ("detachnorm", {"detach": "mean"}), "detachnorm_both": ("detachnorm", {"detach": "both"})}


def time_step(mode: str, norm: str, options: dict, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    functional.COMPILED_NORMS = mode  # dynamo guards on it; reset so each mode compiles afresh
    torch._dynamo.reset()
    module = torch.nn.Sequential(torch.nn.LayerNorm(x.shape[-1])).to(x.device)
    hf_adanorm.patch_model(module, norm, **options)
    compiled = torch.compile(lambda t: module(t) * 1.5 + 0.1, fullgraph=True)

    def step():
        x.grad = None
        compiled(x).backward(grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # compile, then warm up
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x768", "4096x384"], help="ROWSxHIDDEN")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    print(machine_line())
    saved, rows = functional.COMPILED_NORMS, []
    try:
        for shape in args.shapes:
            n, d = (int(v) for v in shape.lower().split("x"))
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, d, generator=gen).to(args.device).requires_grad_(True)
            grad = torch.randn(n, d, generator=gen).to(args.device)
            for variant in args.variants:
                norm, options = VARIANTS[variant]
                ms = {mode: time_step(mode, norm, options, x, grad, args.repeats) for mode in ("kernels", "math")}
                rows.append(dict(shape=shape, device=args.device, variant=variant, kernels_ms=ms["kernels"],
                                 math_ms=ms["math"], math_vs_kernels=ms["math"] / ms["kernels"]))
                print(f"{shape:>10} {variant:18s} kernels {ms['kernels']:8.2f} ms   math {ms['math']:8.2f} ms   "
                      f"math/kernels {ms['math'] / ms['kernels']:.2f}", flush=True)
    finally:
        functional.COMPILED_NORMS = saved
        torch._dynamo.reset()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"compiled_norms_{args.device}.csv"
    write_csv(out, rows)
    return rows


if __name__ == "__main__":
    main()

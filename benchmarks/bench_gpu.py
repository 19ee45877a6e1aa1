"""GPU time, memory and bandwidth of every hf_adanorm norm against torch's LayerNorm.

On a CUDA device each norm runs on its two paths, "triton" (the kernels of
hf_adanorm/triton_norm.py, what CUDA tensors get by default) and "eager" (torch's own
CUDA kernels, HF_ADANORM_TRITON=off), next to ``nn.LayerNorm`` (with affine) and
``F.layer_norm`` (without). Forward and backward are timed separately with
``triton.testing.do_bench`` (median, L2 cache flushed between runs); memory is the peak
allocated during forward + backward beyond the inputs. Bandwidth is the bytes a norm must
move (forward: read x, write z; backward: read x and dL/dz, write dL/dx; plus 8 bytes of
row statistics each way) over its time, as a share of the device's DRAM bandwidth from the
driver (``triton.testing.get_dram_gbps``). Every hf_adanorm kernel is first checked against
a float64 reference (bench_norms.check); one that differs is refused, not reported.

    python benchmarks/bench_gpu.py                      # 16384x4096 and the other shapes, bf16 and fp32
    python benchmarks/bench_gpu.py --shapes 16384x4096 --dtypes bf16
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from bench_norms import DTYPES, FULL_SHAPES, HF_KINDS, FunctionalLayerNorm, Impl, check, plot
from torch import nn

from hf_adanorm import functional

TARGET_SHAPE, TARGET_DTYPE = (16384, 4096), "bfloat16"


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of one call: do_bench on a GPU, a plain loop elsewhere (smoke runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")

    def loop(fn):
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)
    return loop


def peak_gb_per_s(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    from triton.testing import get_dram_gbps
    return float(get_dram_gbps())


def implementations():
    """(name, path, make(d, dtype), math) for the torch baselines and every hf_adanorm norm."""
    impls = [("nn.LayerNorm", "torch", lambda d, dt: nn.LayerNorm(d, dtype=dt), None),
             ("F.layer_norm", "torch", lambda d, dt: FunctionalLayerNorm(d), None)]
    for (name, (make, math)), path in itertools.product(HF_KINDS.items(), ("triton", "eager")):
        impls.append((name, path, lambda d, dt, make=make: make(d), math))
    return impls


class OnPath:
    """Run hf_adanorm on one path ("triton": the default for CUDA tensors, "eager": torch's kernels)."""

    def __init__(self, path: str, device: torch.device):
        on_triton = "auto" if device.type == "cuda" else "always"  # CPU: Triton's interpreter (tests)
        self.mode = {"triton": on_triton, "eager": "off"}.get(path)

    def __enter__(self):
        self.saved = functional.TRITON, functional.CPU_KERNELS
        if self.mode:
            functional.TRITON = self.mode
            functional.CPU_KERNELS = "off"  # "eager" on the CPU smoke test means torch's kernels too

    def __exit__(self, *exc):
        functional.TRITON, functional.CPU_KERNELS = self.saved


def time_both_ways(module, x, g, wrt, time_ms) -> tuple[float, float]:
    """Milliseconds of the forward, and of the backward alone (one graph, kept for re-use)."""
    z = module(x)
    return time_ms(lambda: module(x)), time_ms(lambda: torch.autograd.grad(z, wrt, g, retain_graph=True))


def bench_case(tokens, hidden, dtype, device, time_ms, dram_gbps):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=gen) * 2 + 0.5).to(device, dtype).requires_grad_(True)
    g = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    size = x.element_size()
    moved = {"fwd": tokens * (2 * hidden * size + 8), "bwd": tokens * (3 * hidden * size + 8)}
    rows = []
    for name, path, make, math in implementations():
        module = make(hidden, dtype).to(device)
        row = dict(tokens=tokens, hidden=hidden, dtype=str(dtype).removeprefix("torch."), norm=name, path=path)
        with OnPath(path, device):
            failure_before = functional._failures["triton"], functional.failed_calls["triton"]
            error = check(Impl(name, make, path, math), module, x, g) if math else None
            failure_after = functional._failures["triton"], functional.failed_calls["triton"]
            if path == "triton" and failure_after != failure_before:
                error = f"the Triton kernel failed ({failure_after[0] or 'see the warning above'})"
            if error:
                rows.append({**row, "refused": error})
                print(f"  REFUSED {name} [{path}]: {error}")
                continue
            # nn.LayerNorm's backward also reduces its gain and bias gradients, as in training
            wrt = [x, *module.parameters()]
            row["fwd_ms"], row["bwd_ms"] = time_both_ways(module, x, g, wrt, time_ms)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                torch.autograd.grad(module(x), wrt, g)
                row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        row["full_ms"] = row["fwd_ms"] + row["bwd_ms"]
        for part in ("fwd", "bwd"):
            row[f"{part}_bw_share"] = moved[part] / (row[f"{part}_ms"] * 1e-3) / (dram_gbps * 1e9)
        rows.append(row)
    timed = {(r["norm"], r["path"]): r for r in rows if "refused" not in r}
    ln, f = timed[("nn.LayerNorm", "torch")], timed[("F.layer_norm", "torch")]
    for row in timed.values():
        for part in ("fwd", "bwd", "full"):
            row[f"{part}_vs_ln"] = row[f"{part}_ms"] / ln[f"{part}_ms"]
            row[f"{part}_vs_f"] = row[f"{part}_ms"] / f[f"{part}_ms"]
        if "peak_bytes" in row:
            row["peak_vs_ln"] = row["peak_bytes"] / ln["peak_bytes"]
    return rows


def check_targets(rows) -> list[str]:
    """Issue 6 §3: at 16384x4096 bf16 each norm's Triton path <= 1.0x nn.LayerNorm and >= 80% of DRAM bandwidth."""
    lines = []
    for r in rows:
        if ((r["tokens"], r["hidden"]) == TARGET_SHAPE and r["dtype"] == TARGET_DTYPE and r["path"] == "triton"
                and "refused" not in r):
            ok = r["full_vs_ln"] <= 1.0 and min(r["fwd_bw_share"], r["bwd_bw_share"]) >= 0.8
            lines.append(f"{'PASS' if ok else 'MISS'} {r['norm']}: {r['full_vs_ln']:.2f}x nn.LayerNorm, "
                         f"bandwidth fwd {r['fwd_bw_share']:.0%} bwd {r['bwd_bw_share']:.0%} (targets <= 1.0x, >= 80%)")
    return lines


def print_table(rows):
    print(f"  {'norm':22} {'path':7} {'fwd ms':>8} {'bwd ms':>8} {'full/LN':>8} {'full/F':>7} "
          f"{'fwd BW':>7} {'bwd BW':>7} {'peak/LN':>8}")
    for r in rows:
        if "refused" in r:
            print(f"  {r['norm']:22} {r['path']:7} REFUSED")
            continue
        print(f"  {r['norm']:22} {r['path']:7} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['full_vs_ln']:8.2f} "
              f"{r['full_vs_f']:7.2f} {r['fwd_bw_share']:7.0%} {r['bwd_bw_share']:7.0%} {r.get('peak_vs_ln', float('nan')):8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{t}x{h}" for t, h in FULL_SHAPES],
                        help="tokens x hidden, e.g. 16384x4096")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda", help="cuda (cpu only for smoke tests, in Triton's interpreter)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for GPUs (bench_norms.py measures the CPU)")
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes]
    dram_gbps = peak_gb_per_s(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke run)"
    print(f"device: {name}, DRAM {dram_gbps:.0f} GB/s, torch {torch.__version__}")
    time_ms, rows = timer(device), []
    for dtype_name, (tokens, hidden) in itertools.product(args.dtypes, shapes):
        print(f"\n{tokens}x{hidden} {dtype_name}")
        case = bench_case(tokens, hidden, DTYPES[dtype_name], device, time_ms, dram_gbps)
        print_table(case)
        rows += case
    print("first call (Triton compilation) of each kernel:")
    for key, seconds in functional.first_call_seconds.items():
        print(f"  {seconds:6.2f} s  {key}")
    for line in check_targets(rows):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "gpu_norms.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(["device", *(k for r in rows for k in r)])))
        writer.writeheader()
        writer.writerows({"device": name, **r} for r in rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and .png")
    return rows


if __name__ == "__main__":
    main()

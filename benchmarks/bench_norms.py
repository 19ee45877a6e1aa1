"""Time and memory of every hf_adanorm norm against torch's LayerNorm.

For each shape (tokens x hidden) and dtype every implementation runs forward and
backward once per repeat, all implementations interleaved within a repeat, so load
on a shared machine hits them alike.  Reported: the median over repeats of the
forward, backward and full (forward + backward) times, and of their ratio to
``nn.LayerNorm`` (with affine, what a patch replaces) and ``F.layer_norm`` without
affine (the same memory traffic) *measured in the same repeat*; the peak bytes
allocated during forward + backward (from the profiler's allocation events) and
the bytes saved for backward (``saved_tensors_hooks``, distinct storages).

The limit is the machine's memory bandwidth, so each case also times ``buf.copy_(x)`` (same
dtype, ``buf`` allocated once) in the same repeats. A parameter-free norm moves at least 5
tensors' bytes for forward + backward (read x, write z; read x, read g, write dx) against a
copy's 2, so its "share of copy bandwidth" is ``2.5 * t_copy / t_full`` (forward: ``2 t_copy /
t_fwd``, backward: ``1.5 t_copy / t_bwd``), the median of the per-repeat ratios; GB/s counts the
same bytes. A share of 1 is the norm streaming as fast as a copy.

hf_adanorm norms run on two paths: "cpu" (the C++ kernels of hf_adanorm.cpu_kernels,
what CPU tensors get by default) and "eager" (torch's LayerNorm kernels plus element-wise ops).  Before timing, each one is checked
against a float64 plain-autograd reference (output and input gradient, tolerance
1e-5 for float32, 2e-2 for bfloat16); one that differs is refused, not reported.

    python benchmarks/bench_norms.py --quick     # 8192x768 float32, a few minutes
    python benchmarks/bench_norms.py             # all shapes, float32 and bfloat16
    python benchmarks/bench_norms.py --bandwidth # the copy-bandwidth targets: 2 shapes, 2 dtypes, 1 and 2 threads
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from common import interleaved, machine_line, median_ratio, peak_bytes, saved_bytes
from torch import nn

from hf_adanorm import AdaNorm, DetachNorm, LayerNormSimple, RMSAdaNorm, RMSNormSimple, functional

FULL_SHAPES = [(4096, 768), (8192, 768), (8192, 1024), (16384, 4096), (8192, 1023), (8192, 1500)]
QUICK_SHAPES = [(8192, 768)]
BANDWIDTH_SHAPES = [(16384, 4096), (8192, 768)]
# Tensor passes over memory per direction, for a parameter-free norm, against a copy's 2.
PASSES = {"fwd": 2, "bwd": 3, "full": 5}
BANDWIDTH_TARGET = 0.80  # share of copy bandwidth, forward + backward
BANDWIDTH_NORMS = ("layernorm_simple", "adanorm", "detachnorm_mean", "detachnorm_variance", "detachnorm_both")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Math:
    """What a norm computes, for the reference: z = C (1 - k y) y, detached parts."""

    centre: bool = True
    k: float = 0.0
    C: float = 1.0
    detach_mean: bool = False
    detach_scale: bool = False


@dataclass(eq=False)  # hashed by identity: a dict key per implementation
class Impl:
    name: str
    make: Callable[[int, torch.dtype], nn.Module]
    path: str = "torch"  # "cpu" / "eager" for hf_adanorm (functional.CPU_KERNELS "auto" / "off")
    math: Optional[Math] = None  # None: a torch baseline, not checked


class FunctionalLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, x):
        return F.layer_norm(x, (self.d,))


HF_KINDS = {
    "layernorm_simple": (lambda d: LayerNormSimple(d), Math()),
    "adanorm": (lambda d: AdaNorm(d), Math(k=0.1)),
    "detachnorm_mean": (lambda d: DetachNorm(d, detach="mean"), Math(detach_mean=True)),
    "detachnorm_variance": (lambda d: DetachNorm(d, detach="variance"), Math(detach_scale=True)),
    "detachnorm_both": (lambda d: DetachNorm(d, detach="both"), Math(detach_mean=True, detach_scale=True)),
    "rms_simple": (lambda d: RMSNormSimple(d), Math(centre=False)),
    "rms_adanorm": (lambda d: RMSAdaNorm(d), Math(centre=False, k=0.1)),
}


def implementations(paths, rms_baseline=True) -> list[Impl]:
    impls = [Impl("nn.LayerNorm", lambda d, dt: nn.LayerNorm(d, dtype=dt)),
             Impl("F.layer_norm", lambda d, dt: FunctionalLayerNorm(d))]
    if rms_baseline:
        impls.append(Impl("nn.RMSNorm", lambda d, dt: nn.RMSNorm(d, eps=1e-5, dtype=dt)))
    for (name, (make, math)), path in itertools.product(HF_KINDS.items(), paths):
        impls.append(Impl(name, lambda d, dt, make=make: make(d), path, math))
    return impls


@contextlib.contextmanager
def path_of(impl: Impl):
    saved = functional.CPU_KERNELS
    functional.CPU_KERNELS = {"cpu": "auto", "eager": "off"}.get(impl.path, saved)
    try:
        yield
    finally:
        functional.CPU_KERNELS = saved


def reference(m: Math, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True) if m.centre else torch.zeros_like(x[:, :1])
    sigma = ((x - mu) if m.centre else x).pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    mu = mu.detach() if m.detach_mean else mu
    sigma = sigma.detach() if m.detach_scale else sigma
    y = (x - mu) / sigma
    return (m.C * (1 - m.k * y)).detach() * y


def check(impl: Impl, module, x, g) -> Optional[str]:
    """None when ``module`` matches the float64 reference, else what differs."""
    xr = x.detach().clone().requires_grad_(True)
    z = module(xr)
    z.backward(g)
    tol = TOLERANCE[x.dtype]
    for lo in range(0, x.shape[0], 2048):  # rows are independent: chunk the float64 work
        x64 = x[lo:lo + 2048].double().requires_grad_(True)
        z64 = reference(impl.math, x64)
        (dx64,) = torch.autograd.grad(z64, x64, g[lo:lo + 2048].double())
        for label, got, want in (("output", z[lo:lo + 2048], z64), ("input grad", xr.grad[lo:lo + 2048], dx64)):
            try:
                torch.testing.assert_close(got.detach().double(), want.detach(), rtol=tol,
                                           atol=tol * want.abs().max().item())
            except AssertionError as err:
                return f"{label} differs from the reference: {str(err).splitlines()[1:3]}"
    return None


class Step:
    """One forward + backward of ``module``, remembering the forward's share of the time.

    The step frees its own output and input gradient before it ends, so that the next
    implementation's step does not pay for them: freeing a 256 MiB tensor that glibc mapped anew
    (nn.LayerNorm's) unmaps it, which cost the next step 6-15 % of its time at 16384x4096 bf16."""

    def __init__(self, module, x, g):
        self.module, self.x, self.g, self.forward_s = module, x, g, []

    def reset(self):
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def __call__(self):
        self.reset()
        start = time.perf_counter()
        z = self.module(self.x)
        self.forward_s.append(time.perf_counter() - start)
        z.backward(self.g)
        del z
        self.reset()


def bench_case(tokens, hidden, dtype, impls, repeats, budget_s):
    """Time all ``impls`` and a copy interleaved on one shape and dtype; returns CSV rows."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=gen) * 2 + 0.5).to(dtype).requires_grad_(True)
    g = torch.randn(tokens, hidden, generator=gen).to(dtype)
    copy_buffer = torch.empty_like(x, requires_grad=False)
    dtype_name = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    steps, rows = {}, []
    for impl in impls:
        step = Step(impl.make(hidden, dtype), x, g)
        with path_of(impl):
            error = check(impl, step.module, x, g) if impl.math else None
            if error:
                print(f"  REFUSED {impl.name} [{impl.path}]: {error}")
                rows.append(dict(tokens=tokens, hidden=hidden, dtype=dtype_name, threads=threads,
                                 norm=impl.name, path=impl.path, refused=error))
                continue
            for _ in range(2):  # warm-up: compiles, and dynamo's one recompile for a new row count
                step()
        step.forward_s.clear()
        steps[impl] = step

    def in_path(impl, step):
        def run():
            with path_of(impl):
                step()
        return run

    def copy():
        with torch.no_grad():
            copy_buffer.copy_(x)

    copy()
    full = interleaved({"copy": copy, **{impl: in_path(impl, step) for impl, step in steps.items()}},
                       repeats, budget_s)
    copy_s = full.pop("copy")
    tensor_bytes = x.numel() * x.element_size()
    times = {impl: {"fwd": steps[impl].forward_s, "full": full[impl],
                    "bwd": [b - a for a, b in zip(steps[impl].forward_s, full[impl])]} for impl in steps}
    base = {impl.name: times[impl] for impl in steps if impl.path == "torch"}
    for impl, step in steps.items():
        with path_of(impl):
            peak = peak_bytes(step, step.reset)
            saved = saved_bytes(lambda: step.module(x))
        row = dict(tokens=tokens, hidden=hidden, dtype=dtype_name, threads=threads, norm=impl.name,
                   path=impl.path, repeats=len(full[impl]), peak_bytes=peak, saved_bytes=saved,
                   copy_ms=1e3 * statistics.median(copy_s),
                   copy_gbs=2 * tensor_bytes / statistics.median(copy_s) / 1e9)
        for part in ("fwd", "bwd", "full"):
            row[f"{part}_ms"] = 1e3 * statistics.median(times[impl][part])
            row[f"{part}_gbs"] = PASSES[part] * tensor_bytes / statistics.median(times[impl][part]) / 1e9
            # share of copy bandwidth = (passes / 2) t_copy / t_part, repeat by repeat
            row[f"{part}_share"] = 1 / median_ratio(times[impl][part], [PASSES[part] / 2 * c for c in copy_s])[0]
            for label, other in (("ln", "nn.LayerNorm"), ("f", "F.layer_norm")):
                mid, q1, q3 = median_ratio(times[impl][part], base[other][part])
                row[f"{part}_vs_{label}"] = mid
                if part == "full":
                    row[f"full_vs_{label}_iqr"] = f"{q1:.2f}-{q3:.2f}"
        rows.append(row)
    ln = next(r for r in rows if r["norm"] == "nn.LayerNorm")
    for row in rows:
        if "refused" not in row:
            row["peak_vs_ln"] = row["peak_bytes"] / ln["peak_bytes"]
            row["saved_vs_ln"] = row["saved_bytes"] / ln["saved_bytes"]
    return rows


def print_table(rows):
    ok = [r for r in rows if "refused" not in r]
    if ok:
        print(f"  copy: {ok[0]['copy_ms']:.2f} ms, {ok[0]['copy_gbs']:.1f} GB/s (read + write, median)")
    print(f"  {'norm':22} {'path':6} {'full ms':>8} {'fwd/LN':>7} {'bwd/LN':>7} {'full/LN':>8} "
          f"{'IQR':>10} {'full/F':>7} {'peak/LN':>8} {'saved/LN':>8} {'GB/s f+b':>8} "
          f"{'copy share fwd':>14} {'bwd':>5} {'f+b':>5}")
    for r in rows:
        if "refused" in r:
            print(f"  {r['norm']:22} {r['path']:6} REFUSED")
            continue
        print(f"  {r['norm']:22} {r['path']:6} {r['full_ms']:8.2f} {r['fwd_vs_ln']:7.2f} {r['bwd_vs_ln']:7.2f} "
              f"{r['full_vs_ln']:8.2f} {r['full_vs_ln_iqr']:>10} {r['full_vs_f']:7.2f} "
              f"{r['peak_vs_ln']:8.2f} {r['saved_vs_ln']:8.2f} {r['full_gbs']:8.1f} "
              f"{r['fwd_share']:14.2f} {r['bwd_share']:5.2f} {r['full_share']:5.2f}")


def check_targets(rows) -> list[str]:
    """The performance targets at 8192x768 float32 (default path = cpu)."""
    case = {r["norm"]: r for r in rows if (r["tokens"], r["hidden"], r["dtype"]) == (8192, 768, "float32")
            and r["path"] in ("torch", "cpu") and "refused" not in r}
    if "adanorm" not in case:
        return []
    goals = [("layernorm_simple", "full_vs_ln", 1.0), ("adanorm", "full_vs_ln", 1.0), ("adanorm", "full_vs_f", 1.2),
             ("detachnorm_mean", "full_vs_ln", 1.1), ("detachnorm_variance", "full_vs_ln", 1.1),
             ("detachnorm_both", "full_vs_ln", 1.1)]
    goals += [(name, "saved_vs_ln", 1.0) for name in HF_KINDS]
    return [f"{'PASS' if case[n][key] <= limit else 'MISS'} {n} {key} = {case[n][key]:.2f} (target <= {limit})"
            for n, key, limit in goals if n in case]


def check_bandwidth_targets(rows) -> list[str]:
    """Forward + backward at >= BANDWIDTH_TARGET of copy bandwidth, default path, each case timed."""
    return [f"{'PASS' if r['full_share'] >= BANDWIDTH_TARGET else 'MISS'} {r['norm']} {r['tokens']}x{r['hidden']} "
            f"{r['dtype']} {r['threads']} thread(s): share of copy bandwidth {r['full_share']:.2f} "
            f"(target >= {BANDWIDTH_TARGET}), {r['full_vs_ln']:.2f}x nn.LayerNorm"
            for r in rows if r["norm"] in BANDWIDTH_NORMS and r["path"] == "cpu" and "refused" not in r]


def plot(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one thread count per plot: the most (bench_gpu.py's rows have none)
    threads = max(r.get("threads", 0) for r in rows)
    rows = [r for r in rows if r.get("threads", 0) == threads]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(12, 4.5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        ok = [r for r in rows if r["dtype"] == dtype and "refused" not in r and r["norm"] != "nn.LayerNorm"]
        shapes = sorted({(r["tokens"], r["hidden"]) for r in ok})
        series = sorted({(r["norm"], r["path"]) for r in ok})
        width = 0.8 / len(series)
        colors = plt.get_cmap("tab20").colors
        for i, (norm, p) in enumerate(series):
            heights = [next((r["full_vs_ln"] for r in ok if (r["tokens"], r["hidden"]) == s
                             and (r["norm"], r["path"]) == (norm, p)), float("nan")) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], heights, width, color=colors[i % 20],
                   label=norm if p == "torch" else f"{norm} [{p}]")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"{t}x{h}" for t, h in shapes])
        ax.set_ylabel("forward + backward time / nn.LayerNorm (log)")
        ax.set_title(f"{dtype}, {threads} thread(s): median ratio over interleaved repeats")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8192x768 float32 only")
    parser.add_argument("--bandwidth", action="store_true",
                        help="the copy-bandwidth targets: 16384x4096 and 8192x768, fp32 and bf16, 1 and 2 threads, "
                             "default (cpu) path")
    parser.add_argument("--shapes", nargs="+", help="TOKENSxHIDDEN ..., instead of the default shapes")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, help="default: fp32 bf16 (quick: fp32)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 31, quick 61)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timing per case at most (>= 7 repeats)")
    parser.add_argument("--paths", nargs="+", default=["cpu", "eager"], choices=["cpu", "eager"])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts, each case timed at each (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.bandwidth:
        args.paths = ["cpu"]
        args.threads = args.threads or [1, 2]
    shapes = QUICK_SHAPES if args.quick else BANDWIDTH_SHAPES if args.bandwidth else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    dtypes = [DTYPES[d] for d in (args.dtypes or (["fp32"] if args.quick else list(DTYPES)))]
    repeats = args.repeats or (61 if args.quick else 31)
    print(machine_line())
    rows = []
    for threads, dtype, (tokens, hidden) in itertools.product(args.threads or [None], dtypes, shapes):
        if threads:
            torch.set_num_threads(threads)
        print(f"\n{tokens}x{hidden} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s)")
        # nn.RMSNorm allocates and frees 3-6 activations a step, and the norm timed after it runs
        # measurably slower (LayerNorm-simple, next in line, ~15 % at 8192x768): the bandwidth
        # targets leave it out.
        case = bench_case(tokens, hidden, dtype, implementations(args.paths, rms_baseline=not args.bandwidth),
                          repeats, args.budget)
        print_table(case)
        rows += case
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("first call of each C++ kernel (the first one includes building the extension):")
    for key, seconds in functional.first_call_seconds.items():
        print(f"  {seconds:6.1f} s  {key}")
    for line in check_targets(rows) + check_bandwidth_targets(rows):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "norms_quick" if args.quick else "norms_bandwidth" if args.bandwidth else "norms"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.csv and .png")
    return rows


if __name__ == "__main__":
    main()

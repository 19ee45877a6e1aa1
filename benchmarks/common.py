"""Measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# The scripts import hf_adanorm after this module: let them run from a plain checkout too.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def machine_line() -> str:
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f}")


def interleaved(steps: dict[str, Callable[[], object]], repeats: int, budget_s: float,
                min_repeats: int = 7) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns within every repeat.

    Load that drifts on a shared machine then hits all steps of a repeat alike,
    which is why ratios are taken repeat by repeat (see :func:`median_ratio`).
    The order rotates by one step each repeat, so no step always runs right after the same
    other one: what a step leaves behind (memory to unmap, caches filled with its tensors) costs
    its successor, and at 8192x768 bf16 the norm that always followed F.layer_norm ran ~8 %
    slower than the same kernel placed later.
    """
    times = {name: [] for name in steps}
    order = list(steps)
    start = time.perf_counter()
    for rep in range(repeats):
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            step = steps[name]
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        if rep + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return times


def median_ratio(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-repeat ratios ``times[i] / baseline[i]``."""
    ratios = [a / b for a, b in zip(times, baseline)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), q1, q3


def peak_bytes(step: Callable[[], object], reset: Callable[[], object] = lambda: None) -> int:
    """Most CPU bytes held at once by allocations made during ``step()``, beyond those before.

    ``reset()`` runs first, outside the profiled region: it must free what ``step`` would
    free on entry (e.g. last step's gradients), whose release the profiler would otherwise
    count against this step's allocations.
    """
    reset()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The raw allocation events (+bytes on alloc, -bytes on free); prof.events() merges them.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate(nbytes for _, nbytes in events), default=0)


def saved_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def write_csv(path, rows: list[dict]) -> None:
    """``rows`` to ``path`` as CSV, the columns those of the first row; prints where it went."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")

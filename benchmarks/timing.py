"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict, repeats: int) -> dict:
    """Median wall time of each `fns[name]()` over `repeats` rounds, after one warm-up call of each. Every round
    calls each function once, so a drift in the machine's speed (a shared machine) shifts all of them alike and
    their ratios stay comparable; timed one after another, the first and the last can see different machines."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_gflops(size: int = 512, seconds: float = 1.0) -> float:
    """fp32 matrix-multiply throughput of this process (its torch threads), in GFLOP/s: a one-second reference
    that makes wall times taken on different machines (or on one shared machine at different times) comparable."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9

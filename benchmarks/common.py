"""Shared helpers for benchmarks: timing, FLOP counting, a measured matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs torch dispatches while running ``fn()`` once (matmuls, attention, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """Dense matmul throughput (FLOP/s) measured now, on this machine, with the current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    sec = median_seconds(lambda: a @ b, repeats, warmup=3)
    return 2.0 * n**3 / sec

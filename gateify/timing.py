"""Latency measurement shared by the ``gateify bench`` command and ``benchmarks/latency.py``."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["measure_latency"]


def measure_latency(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each ``fn`` after ``warmup`` calls, interleaved round-robin so that drift
    (clock, cache, other load) hits every variant alike; CUDA events and synchronisation on a GPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[key].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}

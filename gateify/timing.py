"""Latency measurement shared by the ``gateify bench`` command and ``benchmarks/latency.py``."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Mapping, NamedTuple, Optional

import torch

__all__ = ["measure_latency", "measure_latency_spread", "Spread"]


class Spread(NamedTuple):
    """Milliseconds per call: the median and the quartiles of the timed repeats."""

    median: float
    q1: float
    q3: float


def _balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each ordered pair of different items is adjacent equally often (Williams'
    balanced Latin square: ``n`` rows for even ``n``, those and their reverses for odd ``n``). A rotated round-robin
    is not: its rounds keep every item behind the same neighbour."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def _time_calls(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls of ``fn``: CUDA events on a GPU, the clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def measure_latency_spread(fns: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                           setups: Optional[Mapping[str, Callable[[], object]]] = None,
                           min_sample_ms: float = 0.0) -> dict[str, Spread]:
    """Milliseconds per call of each ``fn`` after ``warmup`` calls, interleaved round-robin so that drift (clock,
    cache, other load) hits every variant alike; CUDA events and synchronisation on a GPU. Each round runs the
    variants in the next order of a balanced Latin square (:func:`_balanced_orders`), so that within the rounds
    every variant follows every other equally often: what ran just before a call (a large model evicting a small
    one's weights from the caches) is no one variant's handicap.

    ``setups[key]``, where given, runs before every call of ``fns[key]`` and is not timed: it puts a model shared
    by several variants into that variant's state (one compiled model, several forced decisions).

    ``min_sample_ms``: each timed sample is the mean of as many back-to-back calls (at most 32) as the slowest
    variant's last warm-up call needs to reach it. A served model runs call after call; a single call timed right
    after another model's is timed cold (a 0.5 ms network took 0.8 ms so), and that penalty is not the variant's.
    """
    setups = setups or {}
    last = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            if key in setups:
                setups[key]()
            last[key] = _time_calls(fn, device, 1)
    slowest = max(last.values(), default=0.0)
    calls = max(1, min(32, math.ceil(min_sample_ms / slowest))) if min_sample_ms > 0 and slowest > 0 else 1
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    orders = _balanced_orders(len(keys))
    for r in range(repeats):
        for key in (keys[i] for i in orders[r % len(orders)]):
            if key in setups:
                setups[key]()
            times[key].append(_time_calls(fns[key], device, calls))
    out = {}
    for key, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[key] = Spread(statistics.median(values), q[0], q[2])
    return out


def measure_latency(fns: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                    setups: Optional[Mapping[str, Callable[[], object]]] = None) -> dict[str, float]:
    """Median milliseconds per call of each ``fn`` (see :func:`measure_latency_spread`)."""
    return {k: s.median for k, s in measure_latency_spread(fns, device, warmup, repeats, setups).items()}

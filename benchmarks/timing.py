"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, which puts this folder on the
import path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Mean and standard deviation in milliseconds of ``step`` over ``repeats`` runs after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.mean(times), statistics.stdev(times) if len(times) > 1 else 0.0

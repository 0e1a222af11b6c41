"""Timing: per-operation samples of one repetition, and the median over repetitions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Phase", "Sample", "percentile", "summarize", "time_each", "time_one"]


@dataclass
class Sample:
    """One phase of one repetition: latency of every operation and the phase's wall time.

    ``elapsed_ns`` is the sum of the latencies for sequential phases (only the operations are
    timed, not the loop that prepares them) and the wall time for concurrent ones.
    """

    latencies_ns: list[int]
    elapsed_ns: int

    @property
    def ops(self) -> int:
        return len(self.latencies_ns)

    @property
    def ops_per_s(self) -> float:
        return self.ops / (self.elapsed_ns / 1e9) if self.elapsed_ns else 0.0


@dataclass
class Phase:
    """One phase (create, restore, list...) summarized: each number is the median over reps."""

    ops: int
    """Operations per repetition."""
    ops_per_s: float
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float
    """Mean latency; for concurrent phases the wall time per operation."""
    repetitions: list[dict[str, float]] = field(default_factory=list)
    """Per repetition: ops_per_s, p50_us, p99_us, max_us, mean_us."""


def percentile(sorted_values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _stats(sample: Sample) -> dict[str, float]:
    ordered = sorted(sample.latencies_ns)
    return {
        "ops_per_s": sample.ops_per_s,
        "p50_us": percentile(ordered, 0.50) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
        "max_us": (ordered[-1] if ordered else 0) / 1e3,
        "mean_us": sample.elapsed_ns / max(sample.ops, 1) / 1e3,
    }


def summarize(samples: Sequence[Sample]) -> Phase:
    per_rep = [_stats(sample) for sample in samples]

    def median(name: str) -> float:
        return statistics.median(rep[name] for rep in per_rep) if per_rep else 0.0

    return Phase(
        ops=samples[0].ops if samples else 0,
        ops_per_s=median("ops_per_s"),
        p50_us=median("p50_us"),
        p99_us=median("p99_us"),
        max_us=median("max_us"),
        mean_us=median("mean_us"),
        repetitions=per_rep,
    )


async def time_one(operation: Callable[[], Awaitable[Any]], latencies: list[int]) -> Any:
    """Await ``operation()`` and append its latency; returns its result."""
    start = time.perf_counter_ns()
    result = await operation()
    latencies.append(time.perf_counter_ns() - start)
    return result


async def time_each(operations: Sequence[Callable[[], Awaitable[Any]]]) -> Sample:
    """Run prepared operations one after another, timing each."""
    latencies: list[int] = []
    for operation in operations:
        await time_one(operation, latencies)
    return Sample(latencies, sum(latencies))

"""Latency histograms the scheduler keeps for its metrics (layer 1: pure, no imports from zfabric).

The rule it keeps: an observation costs one bisect and one increment, so the scheduler can time every
task; the buckets are fixed, in seconds, as Prometheus histograms want them.
"""

from __future__ import annotations

from bisect import bisect_left

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
           300.0)


class Histogram:
    """Counts of observations at or under each bound of `BUCKETS` (the last count: over them all)."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or under it)`` pairs, ending with ``("+Inf", count)``."""
        out, running = [], 0
        for bound, n in zip(BUCKETS, self.counts):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out

    def copy(self) -> "Histogram":
        other = Histogram()
        other.counts, other.total, other.count = list(self.counts), self.total, self.count
        return other

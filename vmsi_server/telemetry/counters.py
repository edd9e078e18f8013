"""Counters: per (region, access kind, path) statistics, named counters, gauges.

The hot path touches an ``AccessStat`` it looked up once (``Counters.access``
returns the same object for the same key), so recording is an attribute
increment and, where timed, one list increment. Nothing here allocates per
event.

Latency histograms use log2 buckets of nanoseconds: bucket ``b`` holds values
``v`` with ``v.bit_length() == b``, i.e. ``2**(b-1) <= v < 2**b``. Percentiles
are estimated as the midpoint of the bucket the rank falls in, clamped to the
observed min and max, so they are within a factor of 1.5 of the truth.

``snapshot()`` returns plain dicts, lists, ints and floats (JSON-serialisable)
and may be called while the server runs (from the loop or another thread: it
copies the containers before iterating).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmsi_server.telemetry.collectors import Collectors
from vmsi_server.telemetry.cpu import process_cpu_seconds

BUCKETS = 64


class Histogram:
    """Log2-bucketed latency histogram (ns)."""

    __slots__ = ("buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.buckets = [0] * BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, ns: int) -> None:
        if ns < 0:
            ns = 0
        b = ns.bit_length()
        self.buckets[b if b < BUCKETS else BUCKETS - 1] += 1
        if self.count == 0 or ns < self.min:
            self.min = ns
        if ns > self.max:
            self.max = ns
        self.count += 1
        self.total += ns

    def percentile(self, p: float) -> float:
        """Estimated ``p``-th percentile (0 < p <= 100); 0.0 when empty."""
        if self.count == 0:
            return 0.0
        rank = max(1, -(-int(p * self.count) // 100))  # ceil(p% of count), at least 1
        if rank >= self.count:
            return float(self.max)
        seen = 0
        buckets = list(self.buckets)
        for b, n in enumerate(buckets):
            seen += n
            if seen >= rank:
                if b == 0:
                    return 0.0
                estimate = 1.5 * (1 << (b - 1))  # midpoint of [2**(b-1), 2**b)
                return float(min(max(estimate, self.min), self.max))
        return float(self.max)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    # -- combining exported histograms (several VFs; before/after a run) ------
    @classmethod
    def from_snapshot(cls, snap: dict[str, Any]) -> Histogram:
        """Rebuild a histogram from ``snapshot()`` output (e.g. read over the control socket)."""
        h = cls()
        for b, n in snap.get("log2_buckets", {}).items():
            h.buckets[int(b)] = int(n)
        h.count = int(snap.get("count", 0))
        total = snap.get("total_ns")
        h.total = int(total) if total is not None else round(snap.get("mean_ns", 0.0) * h.count)
        h.min = int(snap.get("min_ns", 0))
        h.max = int(snap.get("max_ns", 0))
        return h

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples (another VF's histogram of the same kind)."""
        if not other.count:
            return
        self.min = other.min if not self.count else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        for b, n in enumerate(other.buckets):
            self.buckets[b] += n

    def minus(self, earlier: Histogram) -> Histogram:
        """The samples recorded since ``earlier`` (a snapshot of this same histogram).

        Counts, totals and buckets are exact. The minimum and maximum of the
        interval are not recoverable, so the result keeps this histogram's
        lifetime min/max (percentiles are clamped to them, nothing more).
        """
        d = Histogram()
        d.buckets = [max(0, a - b) for a, b in zip(self.buckets, earlier.buckets, strict=True)]
        d.count = max(0, self.count - earlier.count)
        d.total = max(0, self.total - earlier.total)
        if d.count:
            d.min, d.max = self.min, self.max
        return d

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_ns": self.total,
            "mean_ns": self.mean,
            "min_ns": self.min,
            "max_ns": self.max,
            "p50_ns": self.percentile(50),
            "p99_ns": self.percentile(99),
            "log2_buckets": {str(b): n for b, n in enumerate(list(self.buckets)) if n},
        }


class AccessStat:
    """One (region, kind, path): how many, how many failed, and (if timed) how long."""

    __slots__ = ("count", "errors", "latency")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.latency = Histogram()

    def record(self, ns: int) -> None:
        """Count one access that took ``ns``."""
        self.count += 1
        self.latency.record(ns)


class Counters(Collectors):
    """All statistics of one server process.

    ``time_fast_path``: whether fast-path accesses are timed too (two
    ``perf_counter_ns`` calls, roughly 0.1 us each, on a path that costs about
    1 us). Forwarded accesses are always timed. Fast-path accesses are always
    counted.
    """

    def __init__(self, *, time_fast_path: bool = False, process_cpu: bool = True) -> None:
        self.time_fast_path = time_fast_path
        self._access: dict[tuple[str, str, str], AccessStat] = {}
        self._named: dict[str, int] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._collectors: list[Callable[[], None]] = []
        if process_cpu:
            self.add_gauge("cpu.io_process_seconds", process_cpu_seconds)

    # -- per access ---------------------------------------------------
    def access(self, region: str, kind: str, path: str) -> AccessStat:
        """The stat for a key, created on first use; look it up once, keep it."""
        key = (region, kind, path)
        stat = self._access.get(key)
        if stat is None:
            stat = self._access[key] = AccessStat()
        return stat

    def access_count(self, region: str, kind: str, path: str) -> int:
        self.collect()
        stat = self._access.get((region, kind, path))
        return stat.count if stat is not None else 0

    # -- named counters -----------------------------------------------
    def incr(self, name: str, n: int = 1) -> None:
        self._named[name] = self._named.get(name, 0) + n

    def get(self, name: str) -> int:
        return self._named.get(name, 0)

    # -- gauges (read at snapshot time) ---------------------------------
    def add_gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def remove_gauge(self, name: str) -> None:
        self._gauges.pop(name, None)

    def gauge(self, name: str) -> float:
        return self._gauges[name]()

    # -- export -------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        self.collect()
        accesses = []
        for (region, kind, path), stat in sorted(dict(self._access).items()):
            if not (stat.count or stat.errors):
                continue  # looked up (kept for the hot path) but never used
            accesses.append(
                {
                    "region": region,
                    "kind": kind,
                    "path": path,
                    "count": stat.count,
                    "errors": stat.errors,
                    "latency": stat.latency.snapshot(),
                }
            )
        gauges: dict[str, float | None] = {}
        for name, read in sorted(dict(self._gauges).items()):
            try:
                gauges[name] = float(read())
            except Exception:  # a gauge must never break the export
                gauges[name] = None
        return {
            "accesses": accesses,
            "counters": dict(sorted(dict(self._named).items())),
            "gauges": gauges,
        }

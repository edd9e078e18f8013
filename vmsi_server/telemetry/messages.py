"""Per-command message counters of a device: count, errors, service time.

Kept per endpoint (not per connection) so figures survive a QEMU restart and
the main job can read them after the guest is gone. Service time is the time
from a decoded request to its reply being handed to the socket, which is the
part of a vCPU's wait the server is responsible for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmsi_server.protocol.constants import Command
from vmsi_server.telemetry.collectors import Collectors

_BUCKETS = 32
"""log2 buckets of nanoseconds: bucket b holds [2^b, 2^(b+1)) ns; 2^31 ns is 2 s."""


class MessageCounters(Collectors):
    """Counts and a log2 latency histogram per command number."""

    __slots__ = ("_collectors", "counts", "errors", "histograms", "total_ns")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self.total_ns: dict[int, int] = {}
        self.histograms: dict[int, list[int]] = {}
        self._collectors: list[Callable[[], None]] = []

    def record(self, command: int, elapsed_ns: int) -> None:
        counts = self.counts
        counts[command] = counts.get(command, 0) + 1
        self.total_ns[command] = self.total_ns.get(command, 0) + elapsed_ns
        hist = self.histograms.get(command)
        if hist is None:
            hist = self.histograms[command] = [0] * _BUCKETS
        hist[min(_BUCKETS - 1, max(0, elapsed_ns.bit_length() - 1))] += 1

    def merge(self, command: int, count: int, total_ns: int, buckets: list[int]) -> None:
        """Add ``count`` messages counted elsewhere (same bucket scheme as ``record``)."""
        counts = self.counts
        counts[command] = counts.get(command, 0) + count
        self.total_ns[command] = self.total_ns.get(command, 0) + total_ns
        hist = self.histograms.get(command)
        if hist is None:
            hist = self.histograms[command] = [0] * _BUCKETS
        for b, n in enumerate(buckets[:_BUCKETS]):
            hist[b] += n

    def error(self, command: int) -> None:
        self.errors[command] = self.errors.get(command, 0) + 1

    def total(self) -> int:
        self.collect()
        return sum(self.counts.values())

    def count(self, command: int) -> int:
        self.collect()
        return self.counts.get(command, 0)

    def percentile_ns(self, command: int, fraction: float) -> int | None:
        """Upper bound of the bucket holding the given fraction of samples."""
        self.collect()
        hist = self.histograms.get(command)
        if not hist:
            return None
        wanted = fraction * sum(hist)
        seen = 0
        for bucket, n in enumerate(hist):
            seen += n
            if seen >= wanted and n:
                return 1 << (bucket + 1)
        return None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per command name: count, errors, mean/p50/p99 (us), total_ns, log2_buckets.

        ``log2_buckets`` maps bucket index (as a string) to a count; bucket b holds
        [2^b, 2^(b+1)) ns. Subtracting two snapshots gives a window's histogram.
        """
        self.collect()
        out: dict[str, dict[str, Any]] = {}
        for command, n in sorted(self.counts.items()):
            name = _name(command)
            out[name] = {
                "count": n,
                "errors": self.errors.get(command, 0),
                "mean_us": round(self.total_ns[command] / n / 1000, 2),
                "p50_us_le": _us(self.percentile_ns(command, 0.5)),
                "p99_us_le": _us(self.percentile_ns(command, 0.99)),
                # Exact sums and the raw buckets, so a reader can take the
                # difference of two snapshots (a measurement window).
                "total_ns": self.total_ns[command],
                "log2_buckets": {
                    str(b): k for b, k in enumerate(self.histograms[command]) if k
                },
            }
        for command, n in sorted(self.errors.items()):
            if command not in self.counts:
                out[_name(command)] = {"count": 0, "errors": n}
        return out


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"UNKNOWN_{command}"


def _us(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1000, 2)

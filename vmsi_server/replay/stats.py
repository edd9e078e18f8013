"""What a replay run did, as the guests saw it: counts and table-read latencies.

Everything here is the client's (the guests') view. The server's view of the
same run comes from its control socket; ``scripts/seed_table.py`` puts the two
side by side. A ``ReplayStats`` is picklable, so worker processes send theirs
back and the parent merges them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_COUNTS = (
    "raised",
    "handled",
    "signals",
    "contended",
    "affinity_moves",
    "table_reads",
    "flush_reads",
    "table_writes",
    "register_writes",
    "errors",
)


@dataclass
class ReplayStats:
    guests: int = 0
    seconds: float = 0.0
    """Wall time of the measured run (the longest of the workers)."""
    raised: int = 0
    """EICS writes: interrupts the guests asked their devices to raise."""
    handled: int = 0
    """Handler runs: eventfd wake-ups read by the guests."""
    signals: int = 0
    """Sum of the eventfd counts read (> handled when signals coalesced)."""
    contended: int = 0
    """Interrupts that took the mask / flush / unmask path."""
    affinity_moves: int = 0
    table_reads: int = 0
    """Every MSI-X table read issued (synchronous round trips)."""
    flush_reads: int = 0
    """The table reads that were flushes (Linux's readl after a mask or message write)."""
    table_writes: int = 0
    """MSI-X table writes issued (posted)."""
    register_writes: int = 0
    """BAR0 writes issued in the run (EICS to raise, EIMS to re-arm; posted)."""
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    read_latency_ns: list[int] = field(default_factory=list)
    """Client-observed latency of every table read (send to reply)."""
    load_cpu_seconds: float = 0.0
    """CPU of the load generator itself (user + system): not server CPU."""

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 20:
            self.error_messages.append(message)

    def merge(self, other: ReplayStats) -> None:
        self.guests += other.guests
        self.seconds = max(self.seconds, other.seconds)
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_messages.extend(other.error_messages[: max(0, 20 - len(self.error_messages))])
        self.read_latency_ns.extend(other.read_latency_ns)
        self.load_cpu_seconds += other.load_cpu_seconds

    def read_latency_percentile(self, p: float) -> float | None:
        """Nearest-rank ``p``-th percentile of the table-read latency (ns), None if no reads."""
        return percentile(self.read_latency_ns, p)

    def summary(self) -> dict[str, Any]:
        """Counts, rates and latency percentiles (no raw samples), JSON-ready."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        del out["read_latency_ns"]
        secs = self.seconds or float("nan")
        out["handled_per_second"] = self.handled / secs
        out["table_reads_per_second"] = self.table_reads / secs
        out["read_latency_us"] = {
            "p50": _us(self.read_latency_percentile(50)),
            "p99": _us(self.read_latency_percentile(99)),
            "max": _us(float(max(self.read_latency_ns)) if self.read_latency_ns else None),
        }
        return out


def percentile(samples: list[int], p: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, -(-int(p * len(ordered)) // 100))
    return float(ordered[min(rank, len(ordered)) - 1])


def _us(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1000.0, 2)

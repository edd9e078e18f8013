"""Totals over VFs and differences of snapshots (what experiments read)."""

from __future__ import annotations

import json

from vmsi_server.telemetry import summary
from vmsi_server.telemetry.counters import Counters, Histogram


def _device(forwarded_ns: list[int], fast: int, delivered: int) -> dict:  # type: ignore[type-arg]
    c = Counters(process_cpu=False)
    fwd = c.access("msix-table", "read-addr-data", "forward")
    for ns in forwarded_ns:
        fwd.record(ns)
    c.access("msix-table", "read-control", "fast").count += fast
    c.access("msix-table", "write-control", "fast").count += 2
    c.access("msix-vector", "delivered", "fast").count += delivered
    return {"msix": json.loads(json.dumps(c.snapshot()))}


def test_histogram_round_trips_through_its_snapshot() -> None:
    h = Histogram()
    for ns in (700, 1500, 90_000):
        h.record(ns)
    back = Histogram.from_snapshot(json.loads(json.dumps(h.snapshot())))
    assert (back.count, back.total, back.min, back.max) == (h.count, h.total, h.min, h.max)
    assert back.buckets == h.buckets
    assert back.percentile(50) == h.percentile(50)


def test_histogram_merge_and_minus() -> None:
    a, b = Histogram(), Histogram()
    a.record(1000)
    b.record(10)
    b.record(1_000_000)
    a.merge(b)
    assert (a.count, a.min, a.max, a.total) == (3, 10, 1_000_000, 1_001_010)
    earlier = Histogram.from_snapshot(a.snapshot())
    a.record(2000)
    d = a.minus(earlier)
    assert d.count == 1 and d.total == 2000
    assert sum(d.buckets) == 1 and d.buckets[(2000).bit_length()] == 1
    assert Histogram().minus(Histogram()).count == 0


def test_totals_sum_every_vf_per_operation_and_path() -> None:
    devices = [_device([20_000, 40_000], fast=3, delivered=5), _device([30_000], 1, 2)]
    totals = summary.msix_totals(devices)
    assert totals["forwarded_table_reads"] == 3
    assert totals["fast_table_reads"] == 4
    assert totals["table-read"]["forward"]["latency"]["count"] == 3
    assert totals["table-write"]["fast"]["count"] == 4
    assert totals["msix-vector/delivered"]["fast"]["count"] == 7
    json.dumps(totals)


def test_difference_of_two_snapshots() -> None:
    before = summary.totals_of_snapshot({"devices": {"vf0": _device([20_000], 1, 1)}})
    after = summary.totals_of_snapshot(
        {"devices": {"vf0": _device([20_000, 50_000, 60_000], 4, 1)}}
    )
    d = summary.difference(after, before)
    assert summary.count(d, "table-read", "forward") == 2
    assert summary.count(d, "table-read", "fast") == 3
    assert summary.count(d, "table-read") == 5
    assert summary.count(d, "msix-vector/delivered") == 0
    assert summary.latency(d, "table-read", "forward").count == 2
    assert summary.count(d, "pba-read", "fast") == 0
    assert summary.group_of("msix-pba", "read") == "pba-read"

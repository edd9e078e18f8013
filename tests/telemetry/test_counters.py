from __future__ import annotations

import json
import os

from vmsi_server.telemetry.counters import Counters, Histogram
from vmsi_server.telemetry.cpu import pid_cpu_seconds, process_cpu_seconds


def test_histogram_percentiles_within_a_bucket() -> None:
    h = Histogram()
    for _ in range(98):
        h.record(1000)  # bucket [512, 1024)
    h.record(100_000)
    h.record(1_000_000)
    assert h.count == 100
    assert 512 <= h.percentile(50) <= 1024
    assert 65_536 <= h.percentile(99) <= 131_072
    assert h.percentile(100) == 1_000_000
    assert h.min == 1000 and h.max == 1_000_000
    assert h.mean == (98 * 1000 + 100_000 + 1_000_000) / 100


def test_histogram_estimate_clamped_to_observed_range() -> None:
    h = Histogram()
    h.record(700)
    assert h.percentile(50) == 700.0
    assert Histogram().percentile(50) == 0.0


def test_access_stat_is_shared_per_key_and_snapshot_is_json() -> None:
    c = Counters()
    a = c.access("msix-table", "read-addr-data", "forward")
    assert c.access("msix-table", "read-addr-data", "forward") is a
    a.record(20_000)
    a.record(30_000)
    c.access("msix-pba", "read", "fast").count += 3
    c.access("msix-pba", "write", "fast")  # looked up, never used: not exported
    c.incr("qemu.eventfd_swap")
    c.incr("qemu.eventfd_swap", 2)
    c.add_gauge("answer", lambda: 42)
    snap = json.loads(json.dumps(c.snapshot()))
    rows = {(r["region"], r["kind"], r["path"]): r for r in snap["accesses"]}
    assert set(rows) == {("msix-table", "read-addr-data", "forward"), ("msix-pba", "read", "fast")}
    assert rows[("msix-table", "read-addr-data", "forward")]["latency"]["count"] == 2
    assert rows[("msix-pba", "read", "fast")]["count"] == 3
    assert snap["counters"]["qemu.eventfd_swap"] == 3
    assert snap["gauges"]["answer"] == 42.0
    assert snap["gauges"]["cpu.io_process_seconds"] > 0


def test_a_failing_gauge_does_not_break_the_snapshot() -> None:
    c = Counters(process_cpu=False)
    c.add_gauge("broken", lambda: 1 / 0)
    assert c.snapshot()["gauges"] == {"broken": None}


def test_cpu_seconds_of_self_and_of_a_pid() -> None:
    before = process_cpu_seconds()
    x = 0
    for i in range(3_000_000):
        x += i
    assert process_cpu_seconds() > before
    own = pid_cpu_seconds(os.getpid())
    assert own is not None and abs(own - process_cpu_seconds()) < 0.1
    assert pid_cpu_seconds(2**22 + 12345) is None

"""Snapshots carry exact sums and raw buckets, so two of them give a window."""

from __future__ import annotations

import json

from vmsi_server.protocol.constants import Command
from vmsi_server.telemetry.counters import Counters
from vmsi_server.telemetry.messages import MessageCounters


def test_message_snapshot_has_totals_and_buckets_that_subtract() -> None:
    m = MessageCounters()
    m.record(Command.DEVICE_SET_IRQS, 3_000)  # bucket 11: [2048, 4096)
    before = json.loads(json.dumps(m.snapshot()))["DEVICE_SET_IRQS"]
    m.record(Command.DEVICE_SET_IRQS, 100_000)  # bucket 16: [65536, 131072)
    m.record(Command.DEVICE_SET_IRQS, 120_000)
    after = json.loads(json.dumps(m.snapshot()))["DEVICE_SET_IRQS"]
    assert before["total_ns"] == 3_000 and before["log2_buckets"] == {"11": 1}
    assert after["total_ns"] == 223_000
    assert after["log2_buckets"] == {"11": 1, "16": 2}
    window = {b: n - before["log2_buckets"].get(b, 0) for b, n in after["log2_buckets"].items()}
    assert {b: n for b, n in window.items() if n} == {"16": 2}
    assert (after["total_ns"] - before["total_ns"]) / (after["count"] - before["count"]) == 110_000


def test_access_latency_snapshot_has_total() -> None:
    c = Counters(process_cpu=False)
    stat = c.access("msix-irqs", "eventfd-swap", "write-through")
    stat.record(10_000)
    stat.record(30_000)
    latency = c.snapshot()["accesses"][0]["latency"]
    assert latency["total_ns"] == 40_000 and latency["count"] == 2


def test_pid_exec_seconds_is_fine_grained() -> None:
    import os
    import time

    from vmsi_server.telemetry.cpu import pid_exec_seconds

    before = pid_exec_seconds(os.getpid())
    assert before is not None
    t = time.thread_time()
    while time.thread_time() - t < 0.003:  # less than one clock tick of CPU
        pass
    after = pid_exec_seconds(os.getpid())
    assert after is not None and after - before >= 0.002
    assert pid_exec_seconds(2**22 + 12345) is None  # no such pid

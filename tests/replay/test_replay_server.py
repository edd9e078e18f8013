"""The replay against a real server: what each policy does with the guests' table reads.

Counts, never timings: every assertion compares what the guests issued with
what the server (and its slow path) counted.
"""

from __future__ import annotations

import pytest

from vmsi_server.replay import GuestKernel, LoadModel, ReplayRun, socket_paths
from vmsi_server.telemetry import summary
from vmsi_server.telemetry.control import query

from .conftest import StartServer

GUESTS = 3


def _slowpath_table_reads(snap: dict) -> int:  # type: ignore[type-arg]
    for row in snap["slowpath"]["counters"]["accesses"]:
        if (row["region"], row["kind"]) == ("slowpath", "table_read"):
            return int(row["count"])
    return 0


def _run(start_server: StartServer, policy: str, **model_args: object):  # type: ignore[no-untyped-def]
    server = start_server(GUESTS, policy)
    model = LoadModel(
        guests=GUESTS, rate=60.0, contention=0.5, affinity_rate=3.0, duration=1.0,
        **model_args,  # type: ignore[arg-type]
    )
    with ReplayRun(model, socket_paths(server.template, GUESTS)) as replay:
        before = query(server.control)
        stats = replay.run()
        after = query(server.control)
    delta = summary.difference(
        summary.totals_of_snapshot(after), summary.totals_of_snapshot(before)
    )
    return stats, delta, before, after


def _check_interrupts(stats, delta) -> None:  # type: ignore[no-untyped-def]
    assert stats.errors == 0, stats.error_messages
    assert stats.raised > 0
    # Interrupts really came back through the eventfds the device wrote.
    assert stats.handled > 0
    delivered = summary.count(delta, "msix-vector/delivered") + summary.count(
        delta, "msix-vector/redelivered"
    )
    assert stats.handled <= stats.signals <= delivered
    assert stats.contended > 0 and stats.affinity_moves > 0
    # Address/data written through on every affinity move (lo, hi, data), both policies.
    assert summary.count(delta, "table-write", "write-through") == 3 * stats.affinity_moves


def test_shadow_serves_every_table_read_on_the_fast_path(start_server: StartServer) -> None:
    stats, delta, _, _ = _run(start_server, "shadow")
    _check_interrupts(stats, delta)
    assert summary.count(delta, "table-read", "forward") == 0
    assert summary.count(delta, "table-read", "fast") == stats.table_reads > 0
    assert summary.latency(delta, "table-read", "fast").count == stats.table_reads


@pytest.mark.parametrize("workers", [1, 2])
def test_legacy_forwards_every_flush_read(start_server: StartServer, workers: int) -> None:
    stats, delta, before, after = _run(start_server, "legacy", workers=workers)
    _check_interrupts(stats, delta)
    # linux-6 reads the table only to flush (after a mask, after a message write).
    assert stats.flush_reads == stats.table_reads > 0
    assert summary.count(delta, "table-read", "forward") == stats.flush_reads
    assert summary.count(delta, "table-read", "fast") == 0
    # The slow-path worker's own count agrees with the fast path's.
    assert _slowpath_table_reads(after) - _slowpath_table_reads(before) == stats.flush_reads
    assert after["msix_totals"]["forwarded_table_reads"] - before["msix_totals"][
        "forwarded_table_reads"
    ] == stats.flush_reads


def test_legacy_forwards_the_2010_kernels_message_reads_too(start_server: StartServer) -> None:
    stats, delta, _, _ = _run(start_server, "legacy", kernel=GuestKernel.LINUX_2_6)
    _check_interrupts(stats, delta)
    # Flushes after mask and unmask, plus read_msi_msg's three reads per affinity move.
    assert stats.flush_reads == 2 * stats.contended + 2 * stats.affinity_moves
    assert stats.table_reads == stats.flush_reads + 3 * stats.affinity_moves
    assert summary.count(delta, "table-read", "forward") == stats.table_reads

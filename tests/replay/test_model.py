"""The load model and the run statistics, without a server."""

from __future__ import annotations

import pytest

from vmsi_server.replay import GuestKernel, LoadModel, ReplayStats, socket_paths
from vmsi_server.replay.stats import percentile


def test_defaults_are_the_seed_scenario() -> None:
    m = LoadModel()
    assert (m.guests, m.contention, m.kernel) == (24, 1.0, GuestKernel.LINUX_6)
    assert m.processes == 2
    assert LoadModel(guests=1).processes == 1


@pytest.mark.parametrize(
    "bad",
    [dict(guests=0), dict(rate=-1.0), dict(contention=1.5), dict(duration=0.0),
     dict(workers=0), dict(vectors=(3,)), dict(vectors=())],
)
def test_model_rejects_nonsense(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        LoadModel(**bad)


def test_expected_table_accesses_per_kernel() -> None:
    modern = LoadModel(rate=100.0, contention=0.5, affinity_rate=1.0)
    # 50 contended/s: 1 flush read, 2 writes each; 1 move/s: 2 reads, 5 writes.
    assert modern.table_accesses_per_second() == (52.0, 105.0)
    old = LoadModel(rate=100.0, contention=0.5, affinity_rate=1.0, kernel=GuestKernel.LINUX_2_6)
    # 2.6: flush on unmask too; a move reads the message back (3) and flushes twice.
    assert old.table_accesses_per_second() == (105.0, 105.0)


def test_socket_paths_from_the_server_template() -> None:
    assert socket_paths("/x/vf{vf}.sock", 3) == ["/x/vf0.sock", "/x/vf1.sock", "/x/vf2.sock"]
    assert socket_paths("/x/vf{vf}.sock", 2, first=4) == ["/x/vf4.sock", "/x/vf5.sock"]
    assert socket_paths("/x/one.sock", 1) == ["/x/one.sock"]
    with pytest.raises(ValueError):
        socket_paths("/x/one.sock", 2)


def test_stats_merge_and_percentiles() -> None:
    a = ReplayStats(guests=2, seconds=1.0, handled=10, table_reads=3, read_latency_ns=[1, 2, 3])
    b = ReplayStats(guests=1, seconds=1.5, handled=5, table_reads=1, read_latency_ns=[100])
    b.error("guest 2: gone")
    a.merge(b)
    assert (a.guests, a.seconds, a.handled, a.table_reads, a.errors) == (3, 1.5, 15, 4, 1)
    assert a.error_messages == ["guest 2: gone"]
    assert a.read_latency_percentile(50) == 2.0
    assert a.read_latency_percentile(100) == 100.0
    assert percentile([], 50) is None
    doc = a.summary()
    assert "read_latency_ns" not in doc and doc["handled_per_second"] == 10.0

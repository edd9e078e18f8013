"""The posted REGION_WRITE lane applies exactly what the general path applies.

``ServerConnection.peek_posted_writes`` must accept only reads made of whole, valid,
posted REGION_WRITEs and leave the connection untouched; the session's
``_serve_posted_writes`` must give the device the same writes, in the same order,
with the same counters and (no) replies as ``_dispatch`` + ``_region_write``.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence

import pytest

from vmsi_server.pci.function import AccessError, IrqSpec, PciFunction, RegionSpec
from vmsi_server.protocol.connection import ClientConnection, ServerConnection
from vmsi_server.protocol.constants import NO_REPLY, Command, RegionInfoFlags
from vmsi_server.protocol.events import Request, VersionNegotiated
from vmsi_server.session import Session
from vmsi_server.transport.loop import EventLoop

WRITE = int(Command.REGION_WRITE)
READ = int(Command.REGION_READ)
_FRAME = struct.Struct("<HHIIIQII")


def posted(msg_id: int, offset: int, region: int, data: bytes, *, flags: int = NO_REPLY,
           size: int | None = None) -> bytes:
    size = 32 + len(data) if size is None else size
    return _FRAME.pack(msg_id, WRITE, size, flags, 0, offset, region, len(data)) + data


def ready_server() -> ServerConnection:
    server, client = ServerConnection(), ClientConnection()
    data, fds, _ = client.request(client.version_request())
    server.receive_data(data, fds)
    assert isinstance(server.next_event(), VersionNegotiated)
    return server


def test_peek_returns_every_write_of_a_burst_and_changes_nothing() -> None:
    burst = posted(1, 0x3818, 0, b"\x05\0\0\0") + posted(2, 0x1524, 0, b"\x01\0\0\0")
    conn = ready_server()
    writes = conn.peek_posted_writes(burst)
    assert writes is not None
    assert [(i, o, r, bytes(d)) for i, o, r, d in writes] == [
        (1, 0x3818, 0, b"\x05\0\0\0"), (2, 0x1524, 0, b"\x01\0\0\0")]
    conn.receive_data(burst)
    events = [conn.next_event(), conn.next_event()]
    assert all(isinstance(e, Request) for e in events)


@pytest.mark.parametrize(
    "data",
    [
        posted(1, 0, 0, b"\0" * 4, flags=0),  # wants a reply: general path
        posted(1, 0, 0, b"\0" * 4, size=35),  # size and count disagree
        posted(1, 0, 0, b"\0" * 4)[:-1],  # truncated
        posted(1, 0, 0, b"\0" * 4) + b"\0" * 8,  # trailing partial header
        posted(1, 2**64 - 2, 0, b"\0" * 4),  # wraps
        _FRAME.pack(1, READ, 32, NO_REPLY, 0, 0, 7, 4),  # a posted read
        posted(1, 0, 0, b"\0" * 4) + _FRAME.pack(2, READ, 32, 0, 0, 0, 7, 4),  # mixed
    ],
)
def test_peek_declines_anything_else(data: bytes) -> None:
    assert ready_server().peek_posted_writes(data) is None


def test_peek_declines_fds_and_an_unnegotiated_connection() -> None:
    data = posted(1, 0, 0, b"\0" * 4)
    assert ready_server().peek_posted_writes(data, (5,)) is None
    assert ServerConnection().peek_posted_writes(data) is None


class Recorder(PciFunction):
    """BAR0 (4 KiB) records writes; offset 0xBAD refuses, 0xDEAD crashes."""

    name = "posted-lane"

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int, bytes]] = []

    @property
    def regions(self) -> Sequence[RegionSpec]:
        rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE
        return [RegionSpec(0, 0x1000, rw)] + [RegionSpec(i) for i in range(1, 7)] + [
            RegionSpec(7, 256, rw)
        ]

    @property
    def irq_specs(self) -> Sequence[IrqSpec]:
        return [IrqSpec(i) for i in range(5)]

    def read(self, region: int, offset: int, count: int) -> bytes:
        return bytes(count)

    def write(self, region: int, offset: int, data: memoryview) -> None:
        if offset == 0xBAD:
            raise AccessError(errno.EINVAL, "refused")
        if offset == 0xDEA:
            raise RuntimeError("device bug")
        self.writes.append((region, offset, bytes(data)))

    def reset(self) -> None:
        pass


def bursts() -> Iterator[bytes]:
    yield posted(1, 0x818, 0, b"\x01\0\0\0")
    yield posted(2, 0x818, 0, b"\x02\0\0\0") + posted(3, 0x524, 0, b"\x07\0\0\0")
    yield posted(4, 0xBAD, 0, b"\0\0\0\0") + posted(5, 0x10, 0, b"\x09\0\0\0")
    yield posted(6, 0xDEA, 0, b"\0\0\0\0")
    yield posted(7, 0x1000, 0, b"\0\0\0\0") + posted(8, 0x20, 0, b"\x03\0\0\0")  # OOB first
    yield posted(9, 0x30, 0, b"")  # count 0
    yield posted(10, 0x3C, 7, b"\x01")  # config space
    yield _FRAME.pack(11, READ, 32, 0, 0, 0, 7, 4)  # a read: must still be answered


def run(monkeypatch: pytest.MonkeyPatch, lane: bool) -> tuple[object, ...]:
    served: list[int] = []
    if lane:
        serve = Session._serve_posted_writes

        def counting(self: Session, writes: list) -> bool:  # type: ignore[type-arg]
            took = serve(self, writes)
            if took:
                served.extend(w[0] for w in writes)
            return took

        monkeypatch.setattr(Session, "_serve_posted_writes", counting)
    else:
        monkeypatch.setattr(ServerConnection, "peek_posted_writes", lambda self, d, f=(): None)
    ours, theirs = socket.socketpair()
    loop = EventLoop(fast_lane=False)  # the Python lanes; the compiled one has its own tests
    device = Recorder()
    session = Session(ours, device, loop)
    session.start()
    client = ClientConnection()
    try:
        theirs.sendall(client.request(client.version_request())[0])
        loop.run_once(1.0)
        theirs.recv(4096)
        for data in bursts():
            theirs.sendall(data)
            loop.run_once(1.0)
        theirs.settimeout(1.0)
        reply = theirs.recv(4096)
        counters = session.counters
        # Whole bursts in bounds took the lane; the one starting out of bounds did not.
        assert served == ([1, 2, 3, 4, 5, 6, 9, 10] if lane else [])
        return (device.writes, dict(counters.counts), dict(counters.errors),
                session._conn.suppressed_errors, reply)
    finally:
        session.close("test over")
        theirs.close()
        loop.close()
        monkeypatch.undo()


def test_lane_and_general_path_apply_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    with_lane = run(monkeypatch, lane=True)
    without = run(monkeypatch, lane=False)
    assert with_lane == without
    writes, counts, errors, suppressed, reply = with_lane
    assert writes[:3] == [(0, 0x818, b"\x01\0\0\0"), (0, 0x818, b"\x02\0\0\0"),
                          (0, 0x524, b"\x07\0\0\0")]
    assert (0, 0x10, b"\x09\0\0\0") in writes  # applied after a refused one
    assert (0, 0x20, b"\x03\0\0\0") in writes  # applied after an out-of-bounds one
    assert errors[WRITE] == 3 and suppressed == 3  # refused, crashed, out of bounds
    assert counts[WRITE] >= 8
    assert _FRAME.unpack_from(reply)[0] == 11  # only the read was answered

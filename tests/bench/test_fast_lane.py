"""The REGION_READ fast lane answers exactly as the general path does.

``ServerConnection.peek_region_read`` must accept only what ``receive_data`` would turn
into one valid REGION_READ ``Request`` and leave the connection untouched; the
session's ``_serve_read`` must produce the same replies, counters and errors as
``_dispatch`` + ``_region_read``. Both are checked by running the same inputs with
the lane on and off.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsi_server.pci.function import AccessError, IrqSpec, PciFunction, RegionSpec
from vmsi_server.protocol import messages as m
from vmsi_server.protocol.codec import frame
from vmsi_server.protocol.connection import (
    REGION_READ_REQUEST_SIZE,
    ClientConnection,
    ServerConnection,
)
from vmsi_server.protocol.constants import NO_REPLY, Command, RegionInfoFlags
from vmsi_server.protocol.errors import LocalProtocolError
from vmsi_server.protocol.events import Request, VersionNegotiated
from vmsi_server.protocol.header import Header
from vmsi_server.session import Session
from vmsi_server.transport.loop import EventLoop

READ = int(Command.REGION_READ)
MAX_XFER = 1 << 20
_RR = struct.Struct("<HHIIIQII")


def ready_server() -> ServerConnection:
    server, client = ServerConnection(), ClientConnection()
    data, fds, _ = client.request(client.version_request())
    server.receive_data(data, fds)
    assert isinstance(server.next_event(), VersionNegotiated)
    return server


def drain(conn: ServerConnection) -> list[object]:
    out: list[object] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


# -- protocol: peek_region_read / region_read_reply --------------------------------------

commands = st.sampled_from([READ, READ, READ, int(Command.REGION_WRITE), 0, 99])
sizes = st.sampled_from([32, 32, 32, 16, 31, 33, 48])
flags = st.sampled_from([0, 0, 0, NO_REPLY, 0x1, 0x20, 0x21, 0x2])
counts = st.one_of(st.sampled_from([0, 1, 4, 8, MAX_XFER, MAX_XFER + 1, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
offsets = st.one_of(st.sampled_from([0, 2**64 - 1, 2**64 - 4, 2**64 - MAX_XFER]),
                    st.integers(0, 2**64 - 1))


@given(st.integers(0, 0xFFFF), commands, sizes, flags, st.sampled_from([0, 0, 5]),
       offsets, st.integers(0, 2**32 - 1), counts)
def test_peek_accepts_exactly_what_becomes_one_region_read_request(
    msg_id: int, command: int, size: int, flag: int, error: int, offset: int, region: int,
    count: int,
) -> None:
    data = _RR.pack(msg_id, command, size, flag, error, offset, region, count)
    peeking, general = ready_server(), ready_server()
    peeked = peeking.peek_region_read(data)
    events = drain(_fed(general, data))
    wanted = [Request(Header(msg_id, READ, 32, 0, 0), m.RegionReadRequest(offset, region, count))]
    if peeked is None:
        assert events != wanted
    else:
        assert peeked == (msg_id, offset, region, count)
        assert events == wanted
    # Peeking changed nothing: the same bytes still give the same events.
    assert drain(_fed(peeking, data)) == events


def _fed(conn: ServerConnection, data: bytes) -> ServerConnection:
    conn.receive_data(data)
    return conn


def test_peek_declines_fds_buffered_bytes_and_an_unnegotiated_connection() -> None:
    data = _RR.pack(1, READ, 32, 0, 0, 0, 7, 4)
    assert ready_server().peek_region_read(data) == (1, 0, 7, 4)
    assert ready_server().peek_region_read(data, (5,)) is None
    assert ServerConnection().peek_region_read(data) is None
    half = ready_server()
    half.receive_data(data[:10])
    assert half.peek_region_read(data) is None
    pipelined = data + _RR.pack(2, READ, 32, 0, 0, 0, 7, 4)
    assert ready_server().peek_region_read(pipelined) is None


@pytest.mark.parametrize("count", [0, 1, 4, 8, 4096])
def test_region_read_reply_is_the_general_reply(count: int) -> None:
    conn = ready_server()
    data = bytes(range(256)) * (count // 256) + bytes(range(count % 256))
    header = Header(0xBEEF, READ, 32, 0, 0)
    general, _ = conn.reply(header, m.RegionReadReply(0x1234, 7, count, data))
    assert conn.region_read_reply(0xBEEF, 0x1234, 7, count, data) == general
    assert conn.region_read_reply(0xBEEF, 0x1234, 7, count, memoryview(data)) == general
    with pytest.raises(LocalProtocolError):
        conn.region_read_reply(0xBEEF, 0x1234, 7, count + 1, data)


# -- session: the lane on and off give the same answers ----------------------------------


class ConfigOnly(PciFunction):
    """Region 7 (256 bytes) and BAR0 (4 KiB); ``mode`` makes reads misbehave."""

    name = "lane-test"

    def __init__(self) -> None:
        super().__init__()
        self.config = bytes(range(256))
        self.mode = "ok"

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
        if self.mode == "access-error":
            raise AccessError(errno.EACCES, "refused")
        if self.mode == "crash":
            raise RuntimeError("device bug")
        if self.mode == "short":
            return b"\0" * (count - 1)
        if region == 0:
            raise AccessError(errno.EINVAL, "BAR0 is write-only here")
        return self.config[offset:offset + count]

    def write(self, region: int, offset: int, data: memoryview) -> None:
        raise AccessError(errno.EINVAL, "read-only")

    def reset(self) -> None:
        pass


def reads() -> Iterator[tuple[str, bytes]]:
    def rr(i: int, offset: int, region: int, count: int, flags: int = 0) -> bytes:
        return _RR.pack(i, READ, 32, flags, 0, offset, region, count)

    yield "ok", rr(1, 0, 7, 4)
    yield "ok", rr(2, 0, 7, 256)
    yield "ok", rr(3, 255, 7, 1)
    yield "ok", rr(4, 0, 7, 0)
    yield "ok", rr(5, 0, 0, 4)              # the device refuses: EINVAL from read()
    yield "ok", rr(6, 256, 7, 1)            # beyond the region
    yield "ok", rr(7, 0, 3, 4)              # absent region (size 0)
    yield "ok", rr(8, 0, 9, 4)              # no such region
    yield "ok", rr(9, 0, 7, MAX_XFER + 1)   # above max_data_xfer_size
    yield "ok", rr(10, 2**64 - 2, 7, 4)     # wraps around
    yield "ok", rr(11, 0, 7, 4, NO_REPLY)   # posted: no answer
    yield "ok", rr(12, 0, 7, 4) + rr(13, 4, 7, 4)  # pipelined
    yield "access-error", rr(14, 0, 7, 4)
    yield "crash", rr(15, 0, 7, 4)
    yield "short", rr(16, 0, 7, 4)
    yield "ok", frame(17, int(Command.DEVICE_GET_INFO), struct.pack("<IIII", 16, 0, 0, 0))


Figures = tuple[dict[int, int], dict[int, int], dict[int, int]]


def run_session(monkeypatch: pytest.MonkeyPatch, lane: bool) -> tuple[list[bytes], Figures]:
    served: list[int] = []
    if lane:
        serve = Session._serve_read

        def counting(self: Session, msg_id: int, *rest: int) -> bool:
            took = serve(self, msg_id, *rest)
            if took:
                served.append(msg_id)
            return took

        monkeypatch.setattr(Session, "_serve_read", counting)
    else:
        monkeypatch.setattr(ServerConnection, "peek_region_read", lambda self, d, f=(): None)
    ours, theirs = socket.socketpair()
    loop = EventLoop(fast_lane=False)  # the Python lanes; the compiled one has its own tests
    device = ConfigOnly()
    session = Session(ours, device, loop)
    session.start()
    client = ClientConnection()
    try:
        theirs.sendall(client.request(client.version_request())[0])
        loop.run_once(1.0)
        replies = [theirs.recv(4096)]
        for mode, data in reads():
            device.mode = mode
            theirs.sendall(data)
            loop.run_once(1.0)
            theirs.setblocking(False)
            try:
                replies.append(theirs.recv(1 << 21))
            except BlockingIOError:
                replies.append(b"")
            theirs.setblocking(True)
        counters = session.counters
        figures: Figures = (dict(counters.counts), dict(counters.errors),
                   {c: sum(h) for c, h in counters.histograms.items()})
        assert not session.closed
        # In-bounds synchronous reads (device failures included) took the lane; the
        # out-of-bounds, posted, pipelined and over-limit ones did not.
        assert served == ([1, 2, 3, 4, 5, 14, 15, 16] if lane else [])
        return replies, figures
    finally:
        session.close("test over")
        theirs.close()
        loop.close()
        monkeypatch.undo()


def test_session_answers_the_same_with_and_without_the_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_lane = run_session(monkeypatch, lane=True)
    without = run_session(monkeypatch, lane=False)
    assert with_lane == without
    replies, (counts, errors, _) = with_lane
    assert replies[1] == _RR.pack(1, READ, 36, 1, 0, 0, 7, 4) + bytes(range(4))
    assert counts[READ] >= 10 and errors[READ] >= 5
    assert replies[11] == b""  # the posted read
    assert len(replies) == 1 + len(list(reads()))
    assert REGION_READ_REQUEST_SIZE == 32

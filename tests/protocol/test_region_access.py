"""REGION_READ / REGION_WRITE: codec and conformance cases 33-36, 38 (protocol parts)."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    LocalProtocolError,
    ProtocolError,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteReply,
    RegionWriteRequest,
    ReplyReceived,
    Request,
    ServerLimits,
    frame,
)
from vmsi_server.protocol.constants import E2BIG, EINVAL, Command

from .helpers import EventFds, bad, connected_pair, is_closed, one, ready_server

RA = struct.Struct("<QII")


def test_read_round_trip() -> None:
    request = RegionReadRequest(0x40, 7, 4)
    assert request.encode() == RA.pack(0x40, 7, 4)
    assert RegionReadRequest.decode(request.encode()) == request
    reply = RegionReadReply(0x40, 7, 4, b"\1\2\3\4")
    assert reply.encode() == RA.pack(0x40, 7, 4) + b"\1\2\3\4"
    assert RegionReadReply.decode(reply.encode()) == reply


def test_write_round_trip() -> None:
    request = RegionWriteRequest(0x10, 0, 4, b"abcd")
    assert request.encode() == RA.pack(0x10, 0, 4) + b"abcd"
    assert RegionWriteRequest.decode(request.encode()) == request
    reply = RegionWriteReply(0x10, 0, 4)
    assert reply.encode() == RA.pack(0x10, 0, 4)
    assert RegionWriteReply.decode(reply.encode()) == reply


def test_write_data_is_a_view_not_a_copy() -> None:
    server = ready_server()
    raw = frame(1, Command.REGION_WRITE, RA.pack(0, 0, 4) + b"wxyz")
    event = one(server, raw)
    assert isinstance(event, Request) and isinstance(event.message, RegionWriteRequest)
    data = event.message.data
    assert isinstance(data, memoryview) and data.readonly and data.tobytes() == b"wxyz"
    assert data.obj is raw


def test_write_data_survives_reuse_of_the_callers_buffer() -> None:
    server = ready_server()
    buf = bytearray(frame(1, Command.REGION_WRITE, RA.pack(0, 0, 4) + b"wxyz"))
    event = one(server, memoryview(buf))
    buf[-4:] = b"...."  # the transport reuses its receive buffer
    assert isinstance(event, Request) and isinstance(event.message, RegionWriteRequest)
    assert event.message.data == b"wxyz"


@pytest.mark.parametrize("offset", [2**64 - 2, 2**64 - 1])
def test_case33_offset_plus_count_wraps(offset: int) -> None:
    for cls, cmd, data in ((RegionReadRequest, Command.REGION_READ, b""),
                           (RegionWriteRequest, Command.REGION_WRITE, b"abcd")):
        payload = RA.pack(offset, 0, 4) + data
        with pytest.raises(ProtocolError):
            cls.decode(payload)
        assert bad(ready_server(), frame(1, cmd, payload)).errno == EINVAL


def test_case33_largest_offset_that_does_not_wrap() -> None:
    assert RegionReadRequest.decode(RA.pack(2**64 - 4, 0, 4)).count == 4


def test_case34_count_above_max_data_xfer_size() -> None:
    server = ready_server()
    limit = server.negotiated.max_data_xfer_size  # type: ignore[union-attr]
    assert bad(server, frame(1, Command.REGION_READ, RA.pack(0, 0, limit + 1))).errno == EINVAL
    event = one(server, frame(2, Command.REGION_READ, RA.pack(0, 0, limit)))
    assert isinstance(event, Request)


def test_case34_write_above_a_small_limit_is_einval_not_fatal() -> None:
    server = ready_server(ServerLimits(max_data_xfer_size=4096))
    payload = RA.pack(0, 0, 4097) + bytes(4097)  # still below the framing limit (WRITE_MULTI)
    event = bad(server, frame(1, Command.REGION_WRITE, payload))
    assert event.errno == EINVAL and not event.fatal


def test_case34_decode_with_max_count() -> None:
    with pytest.raises(ProtocolError):
        RegionReadRequest.decode(RA.pack(0, 0, 9), (), max_count=8)
    with pytest.raises(ProtocolError):
        RegionWriteRequest.decode(RA.pack(0, 0, 9) + bytes(9), (), max_count=8)


def test_case35_count_zero_is_valid() -> None:
    server = ready_server()
    for cmd in (Command.REGION_READ, Command.REGION_WRITE):
        event = one(server, frame(1, cmd, RA.pack(0x10, 0, 0)))
        assert isinstance(event, Request) and event.message.count == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("data", [b"", b"abc", b"abcde"])
def test_case36_write_data_length_must_equal_count(data: bytes) -> None:
    payload = RA.pack(0, 0, 4) + data
    with pytest.raises(ProtocolError):
        RegionWriteRequest.decode(payload)
    assert bad(ready_server(), frame(1, Command.REGION_WRITE, payload)).errno == EINVAL


@pytest.mark.parametrize("payload", [RA.pack(0, 7, 4)[:12], RA.pack(0, 7, 4) + b"x", b""])
def test_read_request_must_be_exactly_16_bytes(payload: bytes) -> None:
    assert bad(ready_server(), frame(1, Command.REGION_READ, payload)).errno == EINVAL


def test_fds_with_region_access_are_closed(eventfds: EventFds) -> None:
    (fd,) = eventfds(1)
    event = bad(ready_server(), frame(1, Command.REGION_READ, RA.pack(0, 7, 4)), [fd])
    assert event.errno == EINVAL and is_closed(fd)


def test_case38_reply_shapes() -> None:
    server = ready_server()
    event = one(server, frame(3, Command.REGION_READ, RA.pack(0x40, 7, 2)))
    assert isinstance(event, Request)
    data, _ = server.reply(event.header, RegionReadReply(0x40, 7, 2, b"\xaa\xbb"))
    assert data == frame(3, Command.REGION_READ, RA.pack(0x40, 7, 2) + b"\xaa\xbb", flags=1)
    with pytest.raises(LocalProtocolError):
        RegionReadReply(0x40, 7, 2, b"\xaa").encode()
    event = one(server, frame(4, Command.REGION_WRITE, RA.pack(0, 0, 1) + b"\1"))
    assert isinstance(event, Request)
    data, _ = server.reply(event.header, RegionWriteReply(0, 0, 1))
    assert data == frame(4, Command.REGION_WRITE, RA.pack(0, 0, 1), flags=1)


def test_client_checks_read_reply_count() -> None:
    server, client = connected_pair()
    data, _, _ = client.request(RegionReadRequest(0, 7, 2))
    event = one(server, data)
    assert isinstance(event, Request)
    reply = frame(event.header.msg_id, Command.REGION_READ, RA.pack(0, 7, 4) + bytes(4), flags=1)
    received = one(client, reply)
    assert isinstance(received, ReplyReceived) and received.errno == E2BIG

"""REGION_WRITE_MULTI: codec, bounds, negotiation and posted-error suppression."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    ProtocolError,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    Request,
    ServerLimits,
    WriteMultiEntry,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import bad, one, ready_server

ONE = struct.Struct("<QII8s")


def entries(n: int) -> tuple[WriteMultiEntry, ...]:
    return tuple(WriteMultiEntry(0x100 + 8 * i, 0, 4, bytes([i % 256]) * 4) for i in range(n))


def test_round_trip() -> None:
    message = RegionWriteMultiRequest(entries(3))
    body = message.encode()
    assert body[:8] == struct.pack("<Q", 3) and len(body) == 8 + 3 * 24
    assert body[8:32] == ONE.pack(0x100, 0, 4, b"\0\0\0\0")
    assert RegionWriteMultiRequest.decode(body) == message
    assert RegionWriteMultiReply().encode() == b""


def test_full_batch_of_200() -> None:
    message = RegionWriteMultiRequest(entries(200))
    event = one(ready_server(), frame(1, Command.REGION_WRITE_MULTI, message.encode(),
                                      flags=0x10))
    assert isinstance(event, Request) and event.message == message


def test_only_count_bytes_are_kept() -> None:
    body = struct.pack("<Q", 1) + ONE.pack(0, 0, 2, b"abcdefgh")
    assert RegionWriteMultiRequest.decode(body).entries[0].data == b"ab"


INVALID = [
    pytest.param(struct.pack("<Q", 0), id="wr_cnt-0"),
    pytest.param(struct.pack("<Q", 201) + ONE.pack(0, 0, 1, b"") * 201, id="wr_cnt-201"),
    pytest.param(struct.pack("<Q", 2) + ONE.pack(0, 0, 1, b""), id="fewer-entries"),
    pytest.param(struct.pack("<Q", 1) + ONE.pack(0, 0, 1, b"") * 2, id="more-entries"),
    pytest.param(struct.pack("<Q", 1) + ONE.pack(0, 0, 9, b""), id="count-9"),
    pytest.param(struct.pack("<Q", 1) + ONE.pack(2**64 - 2, 0, 4, b""), id="wrap"),
    pytest.param(b"\1\0\0", id="short"),
]


@pytest.mark.parametrize("body", INVALID)
def test_invalid(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        RegionWriteMultiRequest.decode(body)
    assert info.value.errno == EINVAL
    server = ready_server()
    event = bad(server, frame(1, Command.REGION_WRITE_MULTI, body, flags=0x10))
    assert event.errno == EINVAL
    assert server.error_reply(event.header, event.errno) == b""  # posted: never answered
    assert server.suppressed_errors == 1


def test_refused_unless_negotiated() -> None:
    body = RegionWriteMultiRequest(entries(1)).encode()
    for server in (ready_server(ServerLimits(write_multiple=False)),
                   ready_server(caps='{"capabilities":{"max_msg_fds":8}}')):
        assert bad(server, frame(1, Command.REGION_WRITE_MULTI, body, flags=0x10)).errno == EINVAL

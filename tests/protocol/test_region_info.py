"""DEVICE_GET_REGION_INFO: codec, conformance case 16, the argsz retry (19) and fds (20)."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    ProtocolError,
    RegionInfoReply,
    RegionInfoRequest,
    ReplyReceived,
    Request,
    encode_frame,
    frame,
)
from vmsi_server.protocol.constants import E2BIG, EINVAL, Command

from .helpers import EventFds, bad, connected_pair, one, ready_server

INFO = struct.Struct("<IIIIQQ")
SPARSE = struct.pack("<HHIII", 1, 1, 0, 1, 0) + struct.pack("<QQ", 0, 0x1000)


def test_request_round_trip() -> None:
    request = RegionInfoRequest(32, 0, 7)
    assert request.encode() == INFO.pack(32, 0, 7, 0, 0, 0)
    assert RegionInfoRequest.decode(request.encode()) == request


def test_reply_round_trip_with_caps_and_fd() -> None:
    reply = RegionInfoReply(32 + len(SPARSE), 0xF, 0, 32, 0x4000, 0, SPARSE, 9)
    body = reply.encode()
    assert body == INFO.pack(32 + len(SPARSE), 0xF, 0, 32, 0x4000, 0) + SPARSE
    assert reply.attached_fds() == (9,)
    assert RegionInfoReply.decode(body, (9,)) == reply


@pytest.mark.parametrize("body", [INFO.pack(31, 0, 7, 0, 0, 0), INFO.pack(0, 0, 7, 0, 0, 0),
                                  INFO.pack(32, 0, 7, 0, 0, 0)[:28], bytes(16)])
def test_case16_argsz_or_body_too_small(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        RegionInfoRequest.decode(body)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(1, Command.DEVICE_GET_REGION_INFO, body)).errno == EINVAL


def test_case19_fit() -> None:
    full = RegionInfoReply(0, 0xF, 0, 32, 0x4000, 0, SPARSE, 9)
    needed = 32 + len(SPARSE)
    small = full.fit(32)
    assert (small.argsz, small.caps, small.fd) == (needed, b"", None)
    assert len(small.encode()) == 32
    assert full.fit(needed) == RegionInfoReply(needed, 0xF, 0, 32, 0x4000, 0, SPARSE, 9)
    assert full.fit(4096).argsz == needed
    plain = RegionInfoReply(0, 3, 7, 0, 256, 0)
    assert plain.fit(32).argsz == 32


def test_case20_fd_only_with_mmap_and_only_one() -> None:
    body = INFO.pack(32, 3, 0, 0, 0x4000, 0)
    with pytest.raises(ProtocolError):
        RegionInfoReply.decode(body, (5,))
    body = INFO.pack(32, 7, 0, 0, 0x4000, 0)
    assert RegionInfoReply.decode(body, (5,)).fd == 5
    with pytest.raises(ProtocolError):
        RegionInfoReply.decode(body, (5, 6))


def test_reply_fd_goes_to_the_wire(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    event = one(server, encode_frame(2, RegionInfoRequest(32, 0, 0)))
    assert isinstance(event, Request)
    data, fds = server.reply(event.header, RegionInfoReply(32, 7, 0, 0, 0x4000, 0, fd=fd))
    assert fds == [fd] and len(data) == 48


def test_client_refuses_a_reply_larger_than_argsz() -> None:
    server, client = connected_pair()
    data, _, _ = client.request(RegionInfoRequest(32, 0, 0))
    event = one(server, data)
    assert isinstance(event, Request)
    big = RegionInfoReply(32 + len(SPARSE), 0xB, 0, 32, 0x4000, 0, SPARSE)
    reply, _ = server.reply(event.header, big)
    received = one(client, reply)
    assert isinstance(received, ReplyReceived) and received.errno == E2BIG
    assert received.message is None
    # the fitted reply is accepted
    data, _, _ = client.request(RegionInfoRequest(32, 0, 0))
    event = one(server, data)
    assert isinstance(event, Request)
    reply, _ = server.reply(event.header, big.fit(32))
    received = one(client, reply)
    assert isinstance(received, ReplyReceived) and received.errno == 0
    assert isinstance(received.message, RegionInfoReply)
    assert received.message.argsz == 32 + len(SPARSE)

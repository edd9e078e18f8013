"""DEVICE_GET_REGION_IO_FDS: defined only (QEMU never sends it); codec round trips."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    ProtocolError,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    Request,
    SubRegionIoFd,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import bad, one, ready_server


def test_request_round_trip() -> None:
    request = RegionIoFdsRequest(16, 0, 0, 0)
    assert request.encode() == struct.pack("<IIII", 16, 0, 0, 0)
    assert RegionIoFdsRequest.decode(request.encode()) == request
    event = one(ready_server(), frame(1, Command.DEVICE_GET_REGION_IO_FDS, request.encode()))
    assert isinstance(event, Request) and event.message == request


def test_reply_round_trip() -> None:
    subs = (SubRegionIoFd(0x10, 4, 0, 0, 0, 0xAB), SubRegionIoFd(0x20, 8, 1, 0, 1, 0))
    reply = RegionIoFdsReply(16 + 80, 0, 0, 2, subs, (30, 31))
    body = reply.encode()
    assert len(body) == 16 + 2 * 40
    assert body[16:56] == struct.pack("<QQIIIIQ", 0x10, 4, 0, 0, 0, 0, 0xAB)
    assert reply.attached_fds() == (30, 31)
    assert RegionIoFdsReply.decode(body, (30, 31)) == reply


@pytest.mark.parametrize("body", [bytes(12), struct.pack("<IIII", 15, 0, 0, 0)])
def test_request_too_small(body: bytes) -> None:
    assert bad(ready_server(), frame(1, Command.DEVICE_GET_REGION_IO_FDS, body)).errno == EINVAL


def test_reply_errors() -> None:
    head = struct.pack("<IIII", 56, 0, 0, 1)
    entry = struct.pack("<QQIIIIQ", 0, 4, 1, 0, 0, 0, 0)
    with pytest.raises(ProtocolError):
        RegionIoFdsReply.decode(head + entry, (3,))  # fd_index 1 but one fd
    with pytest.raises(ProtocolError):
        RegionIoFdsReply.decode(head + entry[:20], ())  # partial entry
    with pytest.raises(ProtocolError):
        RegionIoFdsReply.decode(struct.pack("<IIII", 96, 0, 0, 1) + entry + entry, (3, 4))

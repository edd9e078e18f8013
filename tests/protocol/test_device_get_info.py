"""DEVICE_GET_INFO: codec and conformance case 15 (argsz parts)."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    ProtocolError,
    Request,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import bad, one, ready_server

INFO = struct.Struct("<IIII")


def test_round_trip() -> None:
    request = DeviceGetInfoRequest()
    assert request.encode() == INFO.pack(16, 0, 0, 0)
    assert DeviceGetInfoRequest.decode(request.encode()) == request
    reply = DeviceGetInfoReply(16, 3, 9, 5)
    assert reply.encode() == INFO.pack(16, 3, 9, 5)
    assert DeviceGetInfoReply.decode(reply.encode()) == reply


@pytest.mark.parametrize("body", [INFO.pack(15, 0, 0, 0), INFO.pack(0, 0, 0, 0), bytes(8),
                                  INFO.pack(16, 0, 0, 0)[:12], b""])
def test_case15_argsz_or_body_too_small(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        DeviceGetInfoRequest.decode(body)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(1, Command.DEVICE_GET_INFO, body)).errno == EINVAL


def test_case15_larger_argsz_is_fine_and_reply_says_16() -> None:
    server = ready_server()
    event = one(server, frame(4, Command.DEVICE_GET_INFO, INFO.pack(64, 0, 0, 0)))
    assert isinstance(event, Request) and event.message == DeviceGetInfoRequest(64)
    data, _ = server.reply(event.header, DeviceGetInfoReply(16, 3, 9, 5))
    assert data == frame(4, Command.DEVICE_GET_INFO, INFO.pack(16, 3, 9, 5), flags=1)


def test_reply_short_body() -> None:
    with pytest.raises(ProtocolError):
        DeviceGetInfoReply.decode(bytes(12))

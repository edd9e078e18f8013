"""DEVICE_GET_IRQ_INFO: codec and the protocol part of conformance case 21."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import IrqInfoReply, IrqInfoRequest, ProtocolError, Request, frame
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import bad, one, ready_server

IRQ = struct.Struct("<IIII")


def test_round_trip() -> None:
    request = IrqInfoRequest(16, 0, 2)
    assert request.encode() == IRQ.pack(16, 0, 2, 0)
    assert IrqInfoRequest.decode(request.encode()) == request
    reply = IrqInfoReply(16, 1, 2, 3)
    assert IrqInfoReply.decode(reply.encode()) == reply
    assert reply != IrqInfoRequest(16, 1, 2, 3)  # type: ignore[comparison-overlap]


def test_via_connection() -> None:
    server = ready_server()
    event = one(server, frame(8, Command.DEVICE_GET_IRQ_INFO, IRQ.pack(16, 0, 3, 0)))
    assert isinstance(event, Request) and event.message == IrqInfoRequest(16, 0, 3, 0)
    data, _ = server.reply(event.header, IrqInfoReply(16, 1, 3, 1))
    assert data[16:] == IRQ.pack(16, 1, 3, 1)


@pytest.mark.parametrize("body", [IRQ.pack(15, 0, 0, 0), IRQ.pack(16, 0, 0, 0)[:12], b""])
def test_case21_argsz_or_body_too_small(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        IrqInfoRequest.decode(body)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(1, Command.DEVICE_GET_IRQ_INFO, body)).errno == EINVAL

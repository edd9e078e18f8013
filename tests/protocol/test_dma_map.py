"""DMA_MAP: codec and conformance case 39 (and 7 for its fd)."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    DmaMapReply,
    DmaMapRequest,
    ProtocolError,
    Request,
    encode_frame,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import EventFds, bad, is_closed, one, ready_server

DMA_MAP = struct.Struct("<IIQQQ")


def test_round_trip_with_and_without_fd() -> None:
    for fd in (None, 17):
        message = DmaMapRequest(32, 3, 0x1000, 0x100000000, 0x20000000, fd)
        body = message.encode()
        assert body == DMA_MAP.pack(32, 3, 0x1000, 0x100000000, 0x20000000)
        fds = () if fd is None else (fd,)
        assert message.attached_fds() == fds
        assert DmaMapRequest.decode(body, fds) == message


def test_reply_is_empty() -> None:
    assert DmaMapReply().encode() == b""
    assert DmaMapReply.decode(b"") == DmaMapReply()
    with pytest.raises(ProtocolError):
        DmaMapReply.decode(b"\0")


@pytest.mark.parametrize(
    "body",
    [
        DMA_MAP.pack(31, 3, 0, 0, 4096),
        DMA_MAP.pack(33, 3, 0, 0, 4096),
        DMA_MAP.pack(0, 3, 0, 0, 4096),
        DMA_MAP.pack(32, 3, 0, 0, 4096)[:24],               # short body
        DMA_MAP.pack(32, 3, 0, 0, 4096) + bytes(8),         # trailing bytes
        DMA_MAP.pack(32, 4, 0, 0, 4096),                    # unknown flag
        DMA_MAP.pack(32, 3, 0, 2**64 - 4096, 8192),         # address + size wraps
        DMA_MAP.pack(32, 3, 2**64 - 4096, 0, 8192),         # offset + size wraps
    ],
)
def test_case39_invalid(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        DmaMapRequest.decode(body)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(5, Command.DMA_MAP, body)).errno == EINVAL


def test_fd_travels_with_the_request(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    event = one(server, encode_frame(3, DmaMapRequest(32, 3, 0, 0xC0000, 0x8000)), [fd])
    assert isinstance(event, Request)
    assert isinstance(event.message, DmaMapRequest) and event.message.fd == fd
    data, fds = server.reply(event.header, DmaMapReply())
    assert data == frame(3, Command.DMA_MAP, b"", flags=1) and fds == []


def test_two_fds_are_einval_and_closed(eventfds: EventFds) -> None:
    server = ready_server()
    fds = eventfds(2)
    server.receive_data(encode_frame(3, DmaMapRequest(32, 3, 0, 0, 4096)), fds)
    assert all(is_closed(fd) for fd in fds)  # closed before the event is even read
    event = server.next_event()
    assert event is not None and event.errno == EINVAL  # type: ignore[union-attr]

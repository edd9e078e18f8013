"""DMA_READ / DMA_WRITE (server -> client) in both layouts, and reply matching (case 5)."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    BadRequest,
    ClientConnection,
    DmaLayout,
    DmaReadReply,
    DmaReadRequest,
    DmaWriteReply,
    DmaWriteRequest,
    LocalProtocolError,
    ProtocolError,
    RegionReadRequest,
    ReplyReceived,
    Request,
    ServerConnection,
    UnexpectedReply,
    frame,
)
from vmsi_server.protocol.constants import E2BIG, EFAULT, EINVAL, ENOSYS, Command

from .helpers import EventFds, bad, connected_pair, is_closed, one, ready_server

QEMU, SPEC = DmaLayout.QEMU, DmaLayout.SPEC


def test_qemu_layout_bytes() -> None:
    """Matches QEMU's VFIOUserDMARW: u64 offset, u32 count, data at 12, sizeof 32."""
    assert DmaReadRequest(0x1000, 64).encode(QEMU) == struct.pack("<QI", 0x1000, 64) + bytes(4)
    assert DmaReadReply(0x1000, 3, b"abc").encode(QEMU) == struct.pack("<QI", 0x1000, 3) + \
        b"abc" + bytes(4)
    assert DmaWriteRequest(0x1000, 3, b"abc").encode(QEMU) == struct.pack("<QI", 0x1000, 3) + \
        b"abc" + bytes(4)
    assert DmaWriteReply(0x1000, 3).encode(QEMU) == b""


def test_spec_layout_bytes() -> None:
    assert DmaReadRequest(0x1000, 64).encode(SPEC) == struct.pack("<QQ", 0x1000, 64)
    assert DmaReadReply(0x1000, 3, b"abc").encode(SPEC) == struct.pack("<QQ", 0x1000, 3) + b"abc"
    assert DmaWriteRequest(0x1000, 3, b"abc").encode(SPEC) == struct.pack("<QQ", 0x1000, 3) + \
        b"abc"
    assert DmaWriteReply(0x1000, 3).encode(SPEC) == struct.pack("<QQ", 0x1000, 3)


@pytest.mark.parametrize("layout", [QEMU, SPEC])
def test_round_trips(layout: DmaLayout) -> None:
    for message in (DmaReadRequest(0x2000, 8), DmaReadReply(0x2000, 4, b"\1\2\3\4"),
                    DmaWriteRequest(0x3000, 2, b"hi")):
        assert type(message).decode(message.encode(layout), (), layout) == message
    assert DmaWriteReply.decode(DmaWriteReply(5, 6).encode(SPEC), (), SPEC) == DmaWriteReply(5, 6)
    assert DmaWriteReply.decode(b"", (), QEMU) == DmaWriteReply(0, 0)


def test_default_layout_is_qemu() -> None:
    message = DmaWriteRequest(1, 1, b"x")
    assert message.encode() == message.encode(QEMU)


def test_decode_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        DmaWriteRequest.decode(struct.pack("<QI", 0, 8) + bytes(4 + 4), (), QEMU)
    assert info.value.errno == E2BIG  # QEMU's errno: count larger than the data
    with pytest.raises(ProtocolError):
        DmaWriteRequest.decode(struct.pack("<QQ", 0, 8) + bytes(4), (), SPEC)
    with pytest.raises(ProtocolError):
        DmaReadRequest.decode(struct.pack("<QI", 0, 8), (), QEMU)  # QEMU needs 32 bytes
    with pytest.raises(ProtocolError):
        DmaReadRequest.decode(struct.pack("<QQ", 2**64 - 1, 8), (), SPEC)  # wraps
    with pytest.raises(ProtocolError):
        DmaReadReply.decode(struct.pack("<QI", 0, 8) + bytes(4), (), QEMU)
    with pytest.raises(ProtocolError):
        DmaWriteReply.decode(b"\0", (), QEMU)
    with pytest.raises(ProtocolError):
        DmaReadRequest.decode(DmaReadRequest(0, 1).encode(), (3,))
    with pytest.raises(LocalProtocolError):
        DmaWriteRequest(0, 4, b"abc").encode()


@pytest.mark.parametrize("layout", [QEMU, SPEC])
def test_dma_read_round_trip_between_server_and_client(layout: DmaLayout) -> None:
    server, client = connected_pair(layout)
    data, fds, msg_id = server.request(DmaReadRequest(0x8000, 4))
    assert fds == [] and msg_id in server.outstanding
    event = one(client, data)
    assert isinstance(event, Request) and event.message == DmaReadRequest(0x8000, 4)
    reply, _ = client.reply(event.header, DmaReadReply(0x8000, 4, b"DATA"))
    received = one(server, reply)
    assert isinstance(received, ReplyReceived) and received.errno == 0
    assert received.header.msg_id == msg_id
    assert received.request == DmaReadRequest(0x8000, 4)
    assert received.message == DmaReadReply(0x8000, 4, b"DATA")
    assert not server.outstanding


@pytest.mark.parametrize("layout", [QEMU, SPEC])
def test_dma_write_round_trip(layout: DmaLayout) -> None:
    server, client = connected_pair(layout)
    data, _, _ = server.request(DmaWriteRequest(0x9000, 3, b"xyz"))
    event = one(client, data)
    assert isinstance(event, Request) and event.message == DmaWriteRequest(0x9000, 3, b"xyz")
    reply, _ = client.reply(event.header, DmaWriteReply(0x9000, 3))
    if layout is QEMU:
        assert len(reply) == 16  # QEMU answers with the header only
    received = one(server, reply)
    assert isinstance(received, ReplyReceived) and received.errno == 0
    assert received.message == DmaWriteReply(0x9000, 3)  # filled from the request


def test_reply_for_another_address_is_an_error() -> None:
    server, _ = connected_pair()
    _, _, msg_id = server.request(DmaReadRequest(0x8000, 2))
    reply = frame(msg_id, Command.DMA_READ, DmaReadReply(0x9000, 2, b"ab").encode(), flags=1)
    received = one(server, reply)
    assert isinstance(received, ReplyReceived)
    assert received.errno == EINVAL and received.message is None


def test_error_reply_carries_the_errno() -> None:
    server, client = connected_pair()
    data, _, _ = server.request(DmaReadRequest(0x8000, 2))
    event = one(client, data)
    assert isinstance(event, Request)
    received = one(server, client.error_reply(event.header, EFAULT))
    assert isinstance(received, ReplyReceived) and received.errno == EFAULT
    assert received.message is None and received.request == DmaReadRequest(0x8000, 2)


def test_case5_reply_that_answers_nothing_is_dropped(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    stray = frame(77, Command.REGION_READ, bytes(16), flags=1)
    event = one(server, stray, [fd])
    assert isinstance(event, UnexpectedReply) and is_closed(fd)
    assert server.error_reply(event.header, EINVAL) == b""  # never answer a reply
    with pytest.raises(LocalProtocolError):
        server.reply(event.header, DmaReadReply(0, 0, b""))


def test_case5_reply_with_the_wrong_command_is_dropped() -> None:
    server = ready_server()
    _, _, msg_id = server.request(DmaReadRequest(0, 4))
    event = one(server, frame(msg_id, Command.DMA_WRITE, b"", flags=1))
    assert isinstance(event, UnexpectedReply)
    assert msg_id in server.outstanding  # still waiting for the real answer


def test_case5_reply_before_version() -> None:
    event = one(ServerConnection(), frame(0, Command.VERSION, b"\0\0\0\0", flags=1))
    assert isinstance(event, UnexpectedReply)


def test_server_request_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().request(DmaReadRequest(0, 4))  # before VERSION
    server = ready_server()
    with pytest.raises(LocalProtocolError):
        server.request(RegionReadRequest(0, 0, 4))
    with pytest.raises(LocalProtocolError):
        server.request(DmaReadReply(0, 0, b""))
    with pytest.raises(LocalProtocolError):
        server.request(DmaReadRequest(0, (1 << 20) + 1))


def test_no_reply_request_is_not_tracked() -> None:
    server = ready_server()
    data, _, msg_id = server.request(DmaWriteRequest(0, 1, b"x"), no_reply=True)
    assert data[8] & 0x10 and msg_id not in server.outstanding


def test_ids_skip_outstanding_ones() -> None:
    server = ready_server()
    _, _, first = server.request(DmaReadRequest(0, 1))
    ids = {server.request(DmaReadRequest(0, 1), no_reply=True)[2] for _ in range(65536)}
    assert first not in ids and len(ids) == 65535


@pytest.mark.parametrize("command", [Command.DMA_READ, Command.DMA_WRITE])
def test_dma_requests_sent_to_the_server_are_refused(command: Command) -> None:
    event = bad(ready_server(), frame(1, command, DmaReadRequest(0, 4).encode()))
    assert event.errno == EINVAL


def test_client_side_checks_like_qemu(eventfds: EventFds) -> None:
    _, client = connected_pair()
    (fd,) = eventfds(1)
    event = bad(client, frame(1, Command.DMA_READ, DmaReadRequest(0, 4).encode()), [fd])
    assert event.errno == EINVAL and is_closed(fd)  # "no incoming PCI requests pass FDs"
    assert bad(client, frame(2, Command.REGION_READ, bytes(16))).errno == ENOSYS
    too_big = DmaReadRequest(0, (1 << 20) + 1).encode()
    assert bad(client, frame(3, Command.DMA_READ, too_big)).errno == E2BIG


def test_client_receives_a_dma_request_before_anything_else() -> None:
    client = ClientConnection()
    client.request(client.version_request())
    event = one(client, frame(1, Command.DMA_WRITE, DmaWriteRequest(0, 1, b"z").encode()))
    assert isinstance(event, Request)
    assert not isinstance(event, BadRequest)

"""VERSION: codec round trips and conformance cases 9-14."""

from __future__ import annotations

import json

import pytest

from vmsi_server.protocol import (
    QEMU_CAPABILITIES_JSON,
    BadRequest,
    ProtocolError,
    RegionReadRequest,
    RunState,
    ServerConnection,
    ServerLimits,
    VersionNegotiated,
    VersionReply,
    VersionRequest,
    encode_frame,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, HEADER_SIZE, Command

from .helpers import EventFds, bad, drain, feed, is_closed, one, ready_server


@pytest.mark.parametrize("cls", [VersionRequest, VersionReply])
@pytest.mark.parametrize("caps", ["", "{}", QEMU_CAPABILITIES_JSON, '{"x":"\u00e9"}'])
def test_round_trip(cls: type[VersionRequest], caps: str) -> None:
    message = cls(0, 3, caps)
    body = message.encode()
    assert body[:4] == b"\0\0\3\0"
    if caps:
        assert body.endswith(b"\0") and body.count(b"\0", 4) == 1
    else:
        assert len(body) == 4
    assert cls.decode(body) == message
    assert cls.decode(memoryview(body)) == message


def test_request_and_reply_are_distinct_types() -> None:
    assert VersionRequest(0, 0) != VersionReply(0, 0)  # type: ignore[comparison-overlap]
    assert VersionReply.IS_REPLY and not VersionRequest.IS_REPLY


@pytest.mark.parametrize(
    "body",
    [
        b"",                                   # case 10: shorter than 4 bytes
        b"\0\0\0",
        b"\0\0\0\0{}",                         # case 12: missing NUL
        b"\0\0\0\0{}\0{}\0",                   # NUL inside the text
        b"\0\0\0\0\xff\xfe\0",                 # not UTF-8
        b"\0\0\0\0" + b" " * 4097 + b"\0",     # longer than 4096
    ],
)
def test_decode_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        VersionRequest.decode(body)
    assert info.value.errno == EINVAL


def test_decode_rejects_fds() -> None:
    with pytest.raises(ProtocolError):
        VersionRequest.decode(VersionRequest(0, 0).encode(), (5,))


# ------------------------------------------------------------------ via the connection


def test_case9_first_message_not_version_is_fatal() -> None:
    server = ServerConnection()
    read = encode_frame(1, RegionReadRequest(0, 7, 4))
    version = encode_frame(2, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON))
    events = feed(server, read + version)
    assert len(events) == 1  # nothing after the fatal error is parsed
    event = events[0]
    assert isinstance(event, BadRequest) and event.fatal and event.errno == EINVAL
    assert event.header.command == Command.REGION_READ
    assert server.state is RunState.CLOSED
    err = server.error_reply(event.header, event.errno)
    assert err == frame(1, Command.REGION_READ, b"", flags=0x21, error=EINVAL)
    assert feed(server, version) == []


def test_case9_first_message_not_version_closes_its_fds(eventfds: EventFds) -> None:
    server = ServerConnection()
    fds = eventfds(1)
    server.receive_data(frame(1, Command.DMA_MAP, bytes(32)), fds)
    assert is_closed(fds[0])
    event = server.next_event()
    assert isinstance(event, BadRequest) and event.fatal


@pytest.mark.parametrize("body", [b"", b"\0", b"\0\0\0"])
def test_case10_short_body(body: bytes) -> None:
    event = bad(ServerConnection(), frame(1, Command.VERSION, body))
    assert event.errno == EINVAL and event.fatal


@pytest.mark.parametrize("major", [1, 0xFFFF])
def test_case11_major_not_zero_is_refused_then_closed(major: int) -> None:
    server = ServerConnection()
    event = bad(server, encode_frame(7, VersionRequest(major, 0, QEMU_CAPABILITIES_JSON)))
    assert event.fatal and event.errno == EINVAL
    assert server.state is RunState.CLOSED
    assert server.error_reply(event.header, event.errno)[:2] == b"\x07\x00"


MALFORMED = [
    '{"capabilities":{"max_msg_fds":16}',          # unbalanced braces
    "{'capabilities':{}}",                          # bad quoting
    '{"capabilities":{"max_msg_fds":"16"}}',        # string where a number is expected
    '{"capabilities":{"max_msg_fds":16.0}}',        # float
    '{"capabilities":{"max_msg_fds":true}}',        # bool is not a number
    '{"capabilities":{"max_msg_fds":-1}}',          # below 0
    '{"capabilities":{"max_msg_fds":1025}}',        # above 1024
    '{"capabilities":{"max_data_xfer_size":0}}',
    '{"capabilities":{"max_data_xfer_size":"1M"}}',
    '{"capabilities":{"pgsizes":4095}}',
    '{"capabilities":{"write_multiple":1}}',
    '{"capabilities":{"migration":{"pgsize":4095}}}',   # bad migration page size
    '{"capabilities":{"migration":{"pgsize":0}}}',
    '{"capabilities":{"migration":{"pgsize":12288}}}',  # not a power of two
    '{"capabilities":{"migration":{"pgsize":"4096"}}}',
    '{"capabilities":{"migration":{}}}',
    '{"capabilities":{"migration":4096}}',
    '{"capabilities":[]}',
    '{"capabilities":{"max_msg_fds":NaN}}',
    "[]",
    "16",
    "[" * 3000 + "]" * 3000,                      # nesting deep enough for RecursionError
]


@pytest.mark.parametrize("text", MALFORMED)
def test_case12_malformed_capabilities(text: str) -> None:
    server = ServerConnection()
    event = bad(server, encode_frame(1, VersionRequest(0, 0, text)))
    assert event.errno == EINVAL and event.fatal


def test_case12_missing_nul() -> None:
    body = VersionRequest(0, 0, QEMU_CAPABILITIES_JSON).encode()[:-1]
    event = bad(ServerConnection(), frame(1, Command.VERSION, body))
    assert event.errno == EINVAL and event.fatal


def test_case12_oversized_string_is_refused_without_reading_it() -> None:
    server = ServerConnection()
    huge = VersionRequest(0, 0, '{"capabilities":{}, "pad":"' + "x" * 5000 + '"}').encode()
    raw = frame(1, Command.VERSION, huge)
    event = bad(server, raw[:HEADER_SIZE])  # the header alone is enough
    assert event.fatal and event.errno == EINVAL


@pytest.mark.parametrize("text", ["", "{}", '{"foo":{"bar":1}}', '{"capabilities":{}}'])
def test_case13_no_capabilities_means_defaults(text: str) -> None:
    server = ServerConnection()
    event = one(server, encode_frame(1, VersionRequest(0, 0, text)))
    assert isinstance(event, VersionNegotiated)
    assert event.client.max_msg_fds == 1 and event.client.max_data_xfer_size == 1 << 20
    assert not event.client.write_multiple
    assert event.params.client_max_msg_fds == 1
    assert not event.params.write_multiple
    assert "write_multiple" not in event.reply.capabilities
    assert server.state is RunState.READY


def test_case14_reply_for_qemu() -> None:
    server = ServerConnection()
    request = encode_frame(0x42, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON))
    event = one(server, request)
    assert isinstance(event, VersionNegotiated)
    data, fds = server.reply(event.header, event.reply)
    assert fds == []
    assert len(data) <= len(request)  # QEMU's reply buffer is its request size
    assert data[:2] == b"\x42\x00" and data[2:4] == b"\x01\x00"
    reply = VersionReply.decode(data[HEADER_SIZE:])
    assert (reply.major, reply.minor) == (0, 0)
    assert data.endswith(b"\0")
    caps = json.loads(reply.capabilities)["capabilities"]
    assert caps["max_msg_fds"] == 8  # always stated explicitly
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["write_multiple"] is True  # proposed by QEMU and supported
    assert set(caps) <= {"max_msg_fds", "max_data_xfer_size", "write_multiple", "pgsizes",
                         "max_dma_maps"}
    assert "twin_socket" not in caps and "migration" not in caps


@pytest.mark.parametrize(("proposed", "ours", "agreed"), [(0, 0, 0), (5, 0, 0), (1, 3, 1),
                                                          (4, 3, 3)])
def test_case14_minor_is_the_minimum(proposed: int, ours: int, agreed: int) -> None:
    server = ServerConnection(ServerLimits(minor=ours))
    event = one(server, encode_frame(1, VersionRequest(0, proposed, QEMU_CAPABILITIES_JSON)))
    assert isinstance(event, VersionNegotiated)
    assert event.reply.minor == agreed == event.params.minor


def test_case14_no_write_multiple_unless_proposed() -> None:
    caps = '{"capabilities":{"max_msg_fds":16}}'
    server = ServerConnection()
    event = one(server, encode_frame(1, VersionRequest(0, 0, caps)))
    assert isinstance(event, VersionNegotiated)
    assert "write_multiple" not in event.reply.capabilities


def test_second_version_is_refused_but_not_fatal() -> None:
    server = ready_server()
    event = bad(server, encode_frame(2, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON)))
    assert event.errno == EINVAL and not event.fatal
    assert server.state is RunState.READY
    assert drain(server) == []

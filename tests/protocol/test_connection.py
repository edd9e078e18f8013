"""ServerConnection: framing (cases 1-8), fd attribution, NO_REPLY, EOF and close()."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import (
    QEMU_CAPABILITIES_JSON,
    BadRequest,
    ConnectionClosed,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DmaMapRequest,
    DmaReadReply,
    Event,
    Header,
    LocalProtocolError,
    RegionInfoReply,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    Request,
    RunState,
    ServerConnection,
    SetIrqsRequest,
    VersionNegotiated,
    VersionRequest,
    encode_frame,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, ENOSYS, HEADER_SIZE, Command

from .helpers import EventFds, bad, drain, feed, is_closed, one, ready_server

RA = struct.Struct("<QII")


def read_frame(msg_id: int, offset: int = 0, count: int = 4) -> bytes:
    return encode_frame(msg_id, RegionReadRequest(offset, 7, count))


def map_frame(msg_id: int) -> bytes:
    return encode_frame(msg_id, DmaMapRequest(32, 3, 0, 0x100000 * msg_id, 0x1000))


# ---------------------------------------------------------------- case 1 and 2: framing


@pytest.mark.parametrize("size", [0, 1, 15])
def test_case1_size_below_header_is_fatal(size: int, eventfds: EventFds) -> None:
    server = ready_server()
    fds = eventfds(1)
    events = feed(server, frame(5, Command.REGION_READ, bytes(16), size=size) + read_frame(6), fds)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, BadRequest) and event.fatal and event.errno == EINVAL
    assert server.state is RunState.CLOSED and is_closed(fds[0])
    assert feed(server, read_frame(7)) == []


def test_case2_oversized_message_is_fatal_on_the_header_alone() -> None:
    server = ready_server()
    head = struct.pack("<HHIII", 1, Command.REGION_WRITE, 0xFFFFFFFF, 0, 0)
    event = bad(server, head)
    assert event.fatal and event.header.size == 0xFFFFFFFF
    assert len(server._buf) == 0


def test_case2_limit_is_fixed_part_plus_max_data_xfer_size() -> None:
    server = ready_server()
    limit = server.max_message_size
    assert limit == HEADER_SIZE + 16 + (1 << 20)
    head = struct.pack("<HHIII", 1, Command.REGION_WRITE, limit + 1, 0, 0)
    assert bad(server, head).fatal
    server = ready_server()
    assert feed(server, struct.pack("<HHIII", 1, Command.REGION_WRITE, limit, 0, 0)) == []


def test_case2_sane_cap_before_version() -> None:
    server = ServerConnection()
    assert server.max_message_size == HEADER_SIZE + 4 + 4096 + 1
    event = bad(server, struct.pack("<HHIII", 1, Command.VERSION, 1 << 20, 0, 0))
    assert event.fatal


def test_case3_short_body_is_einval_not_fatal() -> None:
    server = ready_server()
    event = bad(server, frame(1, Command.DEVICE_GET_INFO, struct.pack("<II", 16, 0)))
    assert event.errno == EINVAL and not event.fatal
    assert isinstance(one(server, read_frame(2)), Request)


# ------------------------------------------------------------- case 4: unknown commands


@pytest.mark.parametrize(("command", "errno"), [(0, EINVAL), (19, EINVAL), (100, EINVAL),
                                                (0xFFFF, EINVAL), (16, ENOSYS), (17, ENOSYS),
                                                (18, ENOSYS), (14, ENOSYS)])
def test_case4_unknown_commands_get_an_error_and_the_stream_stays_in_sync(
        command: int, errno: int) -> None:
    server = ready_server()
    body = struct.pack("<II", 8, 0) + bytes(40)
    events = feed(server, frame(1, command, body) + read_frame(2) + frame(3, command, b"") +
                  read_frame(4))
    assert [type(e) for e in events] == [BadRequest, Request, BadRequest, Request]
    first = events[0]
    assert isinstance(first, BadRequest) and first.errno == errno and not first.fatal
    assert server.error_reply(first.header, first.errno) == frame(
        1, command, b"", flags=0x21, error=errno)
    assert [e.header.msg_id for e in events] == [1, 2, 3, 4]  # type: ignore[union-attr]


@pytest.mark.parametrize("flags", [0x2, 0xF, 0x20, 0x30])
def test_invalid_type_or_error_flag_on_a_request(flags: int) -> None:
    server = ready_server()
    events = feed(server, frame(1, Command.REGION_READ, RA.pack(0, 7, 4), flags=flags)
                  + read_frame(2))
    assert isinstance(events[0], BadRequest) and events[0].errno == EINVAL
    assert isinstance(events[1], Request)


# ----------------------------------------------------------------- case 6: NO_REPLY


def test_case6_no_reply_suppresses_replies_and_errors() -> None:
    server = ready_server()
    posted = frame(1, Command.REGION_WRITE, RA.pack(0, 0, 4) + b"abcd", flags=0x10)
    event = one(server, posted)
    assert isinstance(event, Request) and event.header.no_reply
    assert server.reply(event.header, DeviceGetInfoReply(16, 3, 9, 5)) == (b"", [])
    assert server.error_reply(event.header, EINVAL) == b""
    assert server.suppressed_errors == 1
    broken = frame(2, Command.REGION_WRITE, RA.pack(0, 0, 4) + b"ab", flags=0x10)
    event = bad(server, broken)
    assert server.error_reply(event.header, event.errno) == b""
    assert server.suppressed_errors == 2


def test_case6_posted_message_before_a_normal_request_keeps_order() -> None:
    server = ready_server()
    posted = frame(1, Command.REGION_WRITE, RA.pack(0, 0, 1) + b"x", flags=0x10)
    events = feed(server, posted + read_frame(2))
    assert [e.header.msg_id for e in events] == [1, 2]  # type: ignore[union-attr]


# -------------------------------------------------------------- case 7: fds on rejection


def test_case7_fds_on_a_command_that_takes_none_are_closed_first(eventfds: EventFds) -> None:
    server = ready_server()
    fds = eventfds(3)
    server.receive_data(encode_frame(1, DeviceGetInfoRequest()), fds)
    assert all(is_closed(fd) for fd in fds)  # before the event is taken
    event = server.next_event()
    assert isinstance(event, BadRequest) and event.errno == EINVAL


def test_case7_fds_on_version_are_closed(eventfds: EventFds) -> None:
    server = ServerConnection()
    (fd,) = eventfds(1)
    event = bad(server, encode_frame(0, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON)), [fd])
    assert event.fatal and is_closed(fd)


# ------------------------------------------------------------ case 8: stream reassembly


def _stream() -> bytes:
    return b"".join([
        encode_frame(0, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON)),
        map_frame(1),
        encode_frame(2, DeviceGetInfoRequest()),
        encode_frame(3, RegionWriteRequest(0x10, 0, 8, b"12345678"), flags=0x10),
        read_frame(4),
        frame(5, Command.DEVICE_RESET),
        encode_frame(6, SetIrqsRequest(20, 0x21, 2, 0, 0)),
    ])


def _summary(events: list[Event]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Request):
            out.append(("req", event.header, event.message))
        elif isinstance(event, VersionNegotiated):
            out.append(("ver", event.header, event.reply))
        else:
            out.append(event)
    return out


def test_case8_whole_stream_in_one_read() -> None:
    events = feed(ServerConnection(), _stream())
    assert [e.header.msg_id for e in events] == list(range(7))  # type: ignore[union-attr]
    assert isinstance(events[0], VersionNegotiated)
    assert all(isinstance(e, Request) for e in events[1:])


def test_case8_split_at_every_byte_boundary() -> None:
    stream = _stream()
    expected = _summary(feed(ServerConnection(), stream))
    for cut in range(1, len(stream)):
        server = ServerConnection()
        server.receive_data(stream[:cut])
        server.receive_data(stream[cut:])
        assert _summary(drain(server)) == expected, cut


def test_case8_byte_by_byte() -> None:
    stream = _stream()
    expected = _summary(feed(ServerConnection(), stream))
    server = ServerConnection()
    for i in range(len(stream)):
        server.receive_data(stream[i:i + 1])
    assert _summary(drain(server)) == expected
    assert server._buf == b""


def test_case8_three_way_splits() -> None:
    stream = _stream()
    expected = _summary(feed(ServerConnection(), stream))
    for a in range(1, len(stream), 7):
        for b in range(a + 1, len(stream), 13):
            server = ServerConnection()
            for part in (stream[:a], memoryview(stream)[a:b], bytearray(stream[b:])):
                server.receive_data(part)
            assert _summary(drain(server)) == expected, (a, b)


def test_case8_large_write_in_many_chunks() -> None:
    server = ready_server()
    payload = bytes(range(256)) * 4096  # 1 MiB, the max_data_xfer_size
    raw = encode_frame(9, RegionWriteRequest(0, 0, len(payload), payload)) + read_frame(10)
    for i in range(0, len(raw), 65536):
        server.receive_data(raw[i:i + 65536])
    events = drain(server)
    assert [e.header.msg_id for e in events] == [9, 10]  # type: ignore[union-attr]
    write = events[0]
    assert isinstance(write, Request) and isinstance(write.message, RegionWriteRequest)
    assert write.message.data == payload


# ------------------------------------------------------------------ fd attribution


def test_fds_go_to_the_last_message_starting_in_the_chunk(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    events = feed(server, read_frame(1) + encode_frame(2, DeviceGetInfoRequest()) + map_frame(3),
                  [fd])
    assert [type(e) for e in events] == [Request, Request, Request]
    last = events[2]
    assert isinstance(last, Request) and isinstance(last.message, DmaMapRequest)
    assert last.message.fd == fd


def test_fds_wait_for_their_message_to_complete(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    raw = map_frame(1)
    for cut in (1, 10, 16, 20, len(raw) - 1):
        server = ready_server()
        assert feed(server, raw[:cut], [fd]) == []
        event = one(server, raw[cut:])
        assert isinstance(event, Request) and event.message.fd == fd  # type: ignore[attr-defined]


def test_fds_after_the_tail_of_a_previous_message(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    first, second = read_frame(1), map_frame(2)
    assert feed(server, first[:5]) == []
    events = feed(server, first[5:] + second, [fd])
    assert isinstance(events[0], Request) and isinstance(events[0].message, RegionReadRequest)
    assert isinstance(events[1], Request) and events[1].message.fd == fd  # type: ignore[attr-defined]


def test_fds_with_only_continuation_bytes_are_stray(eventfds: EventFds) -> None:
    server = ready_server()
    (fd,) = eventfds(1)
    raw = map_frame(1)
    feed(server, raw[:20])
    events = feed(server, raw[20:], [fd])
    assert is_closed(fd) and server.stray_fds_closed == 1
    assert isinstance(events[0], Request) and events[0].message.fd is None  # type: ignore[attr-defined]


def test_fds_of_a_rejected_last_message_are_closed(eventfds: EventFds) -> None:
    server = ready_server()
    fds = eventfds(2)
    events = feed(server, map_frame(1) + read_frame(2), fds)
    assert isinstance(events[0], Request) and events[0].message.fd is None  # type: ignore[attr-defined]
    assert isinstance(events[1], BadRequest) and all(is_closed(fd) for fd in fds)


def test_set_irqs_fds_attributed_after_split(eventfds: EventFds) -> None:
    fds = eventfds(4)
    raw = encode_frame(5, SetIrqsRequest(20, 0x24, 2, 0, 4))
    server = ready_server()
    (read,) = feed(server, read_frame(4) + raw[:3], fds)
    assert isinstance(read, Request) and isinstance(read.message, RegionReadRequest)
    event = one(server, raw[3:])
    assert isinstance(event, Request) and isinstance(event.message, SetIrqsRequest)
    assert list(event.message.fds) == fds


# ------------------------------------------------------------- EOF, close, misuse


def test_eof_clean_and_unclean(eventfds: EventFds) -> None:
    server = ready_server()
    event = one(server, b"")
    assert isinstance(event, ConnectionClosed) and event.clean
    assert server.state is RunState.CLOSED
    server = ready_server()
    (fd,) = eventfds(1)
    feed(server, map_frame(1)[:10], [fd])
    event = one(server, b"")
    assert isinstance(event, ConnectionClosed) and not event.clean and is_closed(fd)


def test_eof_reports_unanswered_requests() -> None:
    from vmsi_server.protocol import DmaReadRequest

    server = ready_server()
    server.request(DmaReadRequest(0, 8))
    event = one(server, b"")
    assert isinstance(event, ConnectionClosed) and event.unanswered == (DmaReadRequest(0, 8),)


def test_data_after_close_is_ignored_and_fds_closed(eventfds: EventFds) -> None:
    server = ready_server()
    server.close()
    (fd,) = eventfds(1)
    assert feed(server, map_frame(1), [fd]) == [] and is_closed(fd)


def test_close_releases_fds_of_untaken_events_and_partial_messages(eventfds: EventFds) -> None:
    server = ready_server()
    a, b = eventfds(2)
    server.receive_data(map_frame(1), [a])
    server.receive_data(map_frame(2)[:8], [b])
    server.close()
    assert is_closed(a) and is_closed(b)
    assert server.next_event() is None
    server.close()  # idempotent


def test_reply_misuse() -> None:
    server = ready_server()
    event = one(server, read_frame(1))
    assert isinstance(event, Request)
    with pytest.raises(LocalProtocolError):
        server.reply(event.header, DeviceGetInfoReply(16, 3, 9, 5))  # wrong command
    with pytest.raises(LocalProtocolError):
        server.reply(event.header, RegionReadRequest(0, 7, 4))  # not a reply
    with pytest.raises(LocalProtocolError):
        server.reply(Header(1, Command.REGION_READ, 32, 1), RegionReadReply(0, 7, 0, b""))
    with pytest.raises(LocalProtocolError):
        server.reply(event.header, RegionReadReply(0, 7, 0, b""), fds=list(range(17)))
    with pytest.raises(LocalProtocolError):
        server.error_reply(event.header, 0)
    info = Header(2, Command.DEVICE_GET_REGION_INFO, 48)
    _, fds = server.reply(info, RegionInfoReply(32, 7, 0, 0, 4096, 0, fd=99))
    assert fds == [99]
    with pytest.raises(LocalProtocolError):
        server.reply(Header(3, Command.DMA_READ, 32), DmaReadReply(0, 0, b""), fds=[1] * 17)


def test_error_reply_format() -> None:
    server = ready_server()
    header = Header(0x1234, Command.DEVICE_SET_IRQS, 36)
    assert server.error_reply(header, 22) == struct.pack("<HHIII", 0x1234, 8, 16, 0x21, 22)


def test_non_bytes_input_is_copied() -> None:
    server = ready_server()
    buf = bytearray(read_frame(1, offset=0x40))
    server.receive_data(buf)
    buf[16:24] = bytes(8)
    event = server.next_event()
    assert isinstance(event, Request) and event.message == RegionReadRequest(0x40, 7, 4)

"""DEVICE_SET_IRQS: codec and the protocol parts of conformance cases 23, 25, 26, 28, 29."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import ProtocolError, Request, ServerLimits, SetIrqsReply, SetIrqsRequest
from vmsi_server.protocol import frame as make_frame
from vmsi_server.protocol.constants import EINVAL, Command, SetIrqsFlags

from .helpers import EventFds, bad, is_closed, one, ready_server

HEAD = struct.Struct("<IIIII")
NONE, BOOL, EVENTFD = 0x01, 0x02, 0x04
MASK, UNMASK, TRIGGER = 0x08, 0x10, 0x20


def body(flags: int, index: int = 2, start: int = 0, count: int = 1, argsz: int = 20,
         data: bytes = b"") -> bytes:
    return HEAD.pack(argsz, flags, index, start, count) + data


def frame(payload: bytes) -> bytes:
    return make_frame(11, Command.DEVICE_SET_IRQS, payload)


def test_round_trip_eventfd() -> None:
    message = SetIrqsRequest(20, EVENTFD | TRIGGER, 2, 0, 3, (10, 11, 12))
    assert message.encode() == body(EVENTFD | TRIGGER, count=3)
    assert message.attached_fds() == (10, 11, 12)
    assert SetIrqsRequest.decode(message.encode(), (10, 11, 12)) == message
    assert message.data_type is SetIrqsFlags.DATA_EVENTFD
    assert message.action is SetIrqsFlags.ACTION_TRIGGER


def test_round_trip_bool() -> None:
    message = SetIrqsRequest(23, BOOL | TRIGGER, 0, 0, 3, (), (True, False, True))
    assert message.encode() == body(BOOL | TRIGGER, 0, count=3, argsz=23, data=b"\1\0\1")
    assert SetIrqsRequest.decode(message.encode()) == message
    assert SetIrqsRequest.decode(body(BOOL | TRIGGER, 0, count=1, argsz=21, data=b"\7")).bools \
        == (True,)


def test_reply_is_empty() -> None:
    assert SetIrqsReply().encode() == b""


@pytest.mark.parametrize(
    ("flags", "start", "count"),
    [(0x24, 0, 1), (0x24, 5, 1), (0x21, 0, 0), (0x09, 0, 1), (0x11, 0, 1), (0x14, 0, 1)],
)
def test_every_combination_qemu_sends(flags: int, start: int, count: int) -> None:
    message = SetIrqsRequest.decode(body(flags, start=start, count=count))
    assert (message.flags, message.start, message.count, message.fds) == (flags, start, count, ())


def test_eventfd_without_fds_is_a_deassign() -> None:
    message = SetIrqsRequest.decode(body(EVENTFD | TRIGGER, start=0, count=4))
    assert message.fds == () and message.count == 4


INVALID = [
    pytest.param(body(EVENTFD | TRIGGER, argsz=19), id="case23-argsz-19"),
    pytest.param(body(EVENTFD | TRIGGER, argsz=0), id="case23-argsz-0"),
    pytest.param(body(EVENTFD | TRIGGER, argsz=24), id="case23-body-shorter-than-argsz"),
    pytest.param(body(EVENTFD | TRIGGER)[:16], id="case23-short-body"),
    pytest.param(body(NONE | MASK | UNMASK), id="case25-two-actions"),
    pytest.param(body(NONE | MASK | UNMASK | TRIGGER), id="case25-three-actions"),
    pytest.param(body(NONE | BOOL | TRIGGER), id="case25-two-data"),
    pytest.param(body(TRIGGER), id="case25-no-data"),
    pytest.param(body(EVENTFD), id="case25-no-action"),
    pytest.param(body(0x40 | NONE | TRIGGER), id="unknown-flag"),
    pytest.param(body(NONE | TRIGGER, start=0xFFFFFFFF, count=2), id="case26-wrap"),
    pytest.param(body(NONE | TRIGGER, start=2, count=0xFFFFFFFF), id="case26-wrap2"),
    pytest.param(body(EVENTFD | TRIGGER, count=0), id="case28-count0-eventfd"),
    pytest.param(body(NONE | TRIGGER, start=1, count=0), id="case28-count0-start1"),
    pytest.param(body(NONE | MASK, count=0), id="case28-count0-mask"),
    pytest.param(body(BOOL | TRIGGER, count=0), id="case28-count0-bool"),
    pytest.param(body(BOOL | TRIGGER, count=2), id="case29-bool-without-data"),
    pytest.param(body(BOOL | TRIGGER, count=2, argsz=21, data=b"\1"), id="case29-bool-short"),
    pytest.param(body(BOOL | TRIGGER, count=2, argsz=20, data=b"\1\1"),
                 id="case29-bool-data-outside-argsz"),
]


@pytest.mark.parametrize("payload", INVALID)
def test_invalid(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        SetIrqsRequest.decode(payload)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(payload)).errno == EINVAL


def test_case28_disable_all_is_valid() -> None:
    assert SetIrqsRequest.decode(body(NONE | TRIGGER, start=0, count=0)).count == 0


def test_case29_eventfd_count_mismatch_closes_fds(eventfds: EventFds) -> None:
    server = ready_server()
    fds = eventfds(2)
    server.receive_data(frame(body(EVENTFD | TRIGGER, count=3)), fds)
    assert all(is_closed(fd) for fd in fds)
    event = server.next_event()
    assert event is not None and event.errno == EINVAL  # type: ignore[union-attr]


@pytest.mark.parametrize("flags", [NONE | TRIGGER, BOOL | TRIGGER])
def test_case29_fds_without_eventfd_are_refused(eventfds: EventFds, flags: int) -> None:
    (fd,) = eventfds(1)
    data = b"\1" if flags & BOOL else b""
    event = bad(ready_server(), frame(body(flags, count=1, argsz=20 + len(data), data=data)), [fd])
    assert event.errno == EINVAL and is_closed(fd)


def test_eventfds_are_handed_to_the_session(eventfds: EventFds) -> None:
    fds = eventfds(3)
    event = one(ready_server(), frame(body(EVENTFD | TRIGGER, start=4, count=3)), fds)
    assert isinstance(event, Request) and isinstance(event.message, SetIrqsRequest)
    assert list(event.message.fds) == fds
    assert not any(is_closed(fd) for fd in fds)


def test_more_fds_than_max_msg_fds(eventfds: EventFds) -> None:
    server = ready_server(ServerLimits(max_msg_fds=2))
    fds = eventfds(3)
    event = bad(server, frame(body(EVENTFD | TRIGGER, count=3)), fds)
    assert event.errno == EINVAL and all(is_closed(fd) for fd in fds)

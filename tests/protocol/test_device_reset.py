"""DEVICE_RESET: an empty body both ways."""

from __future__ import annotations

import pytest

from vmsi_server.protocol import DeviceResetReply, DeviceResetRequest, ProtocolError, Request, frame
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import EventFds, bad, is_closed, one, ready_server


def test_round_trip() -> None:
    assert DeviceResetRequest().encode() == b""
    assert DeviceResetRequest.decode(b"") == DeviceResetRequest()
    assert DeviceResetReply.decode(b"") == DeviceResetReply()
    assert DeviceResetRequest() != DeviceResetReply()  # type: ignore[comparison-overlap]


def test_header_only_message_is_a_request() -> None:
    server = ready_server()
    event = one(server, frame(3, Command.DEVICE_RESET))
    assert isinstance(event, Request) and event.message == DeviceResetRequest()
    data, _ = server.reply(event.header, DeviceResetReply())
    assert data == frame(3, Command.DEVICE_RESET, flags=1)


def test_body_is_refused() -> None:
    with pytest.raises(ProtocolError):
        DeviceResetRequest.decode(b"\0")
    assert bad(ready_server(), frame(3, Command.DEVICE_RESET, b"\0" * 4)).errno == EINVAL


def test_fds_are_refused(eventfds: EventFds) -> None:
    (fd,) = eventfds(1)
    assert bad(ready_server(), frame(3, Command.DEVICE_RESET), [fd]).errno == EINVAL
    assert is_closed(fd)

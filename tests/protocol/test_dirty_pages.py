"""DIRTY_PAGES (retired): decoded only to be refused cleanly."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import DirtyPagesReply, DirtyPagesRequest, ProtocolError, frame
from vmsi_server.protocol.constants import EINVAL, ENOSYS, Command

from .helpers import bad, ready_server


def test_round_trip() -> None:
    request = DirtyPagesRequest(8, 1)
    assert request.encode() == struct.pack("<II", 8, 1)
    assert DirtyPagesRequest.decode(request.encode() + bytes(16)) == request
    assert DirtyPagesReply.decode(DirtyPagesReply(8, 0).encode()) == DirtyPagesReply(8, 0)


def test_refused_with_enosys() -> None:
    event = bad(ready_server(), frame(1, Command.DIRTY_PAGES, struct.pack("<II", 8, 1)))
    assert event.errno == ENOSYS and not event.fatal


@pytest.mark.parametrize("body", [b"", bytes(4), struct.pack("<II", 4, 1)])
def test_malformed_is_einval(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        DirtyPagesRequest.decode(body)
    assert bad(ready_server(), frame(1, Command.DIRTY_PAGES, body)).errno == EINVAL

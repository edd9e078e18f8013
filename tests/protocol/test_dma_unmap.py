"""DMA_UNMAP: codec and conformance case 43."""

from __future__ import annotations

import struct

import pytest

from vmsi_server.protocol import DmaUnmapReply, DmaUnmapRequest, ProtocolError, Request, frame
from vmsi_server.protocol.constants import EINVAL, Command

from .helpers import EventFds, bad, is_closed, one, ready_server

UNMAP = struct.Struct("<IIQQ")


@pytest.mark.parametrize("cls", [DmaUnmapRequest, DmaUnmapReply])
def test_round_trip(cls: type[DmaUnmapRequest]) -> None:
    message = cls(24, 0, 0x100000, 0x20000)
    assert message.encode() == UNMAP.pack(24, 0, 0x100000, 0x20000)
    assert cls.decode(message.encode()) == message
    assert not message.unmap_all


def test_reply_echoes_the_entry() -> None:
    server = ready_server()
    event = one(server, frame(9, Command.DMA_UNMAP, UNMAP.pack(24, 0, 0x1000, 0x1000)))
    assert isinstance(event, Request) and isinstance(event.message, DmaUnmapRequest)
    m = event.message
    data, _ = server.reply(event.header, DmaUnmapReply(m.argsz, m.flags, m.address, m.size))
    assert data[16:] == UNMAP.pack(24, 0, 0x1000, 0x1000)


def test_unmap_all_with_zero_range_is_valid() -> None:
    message = DmaUnmapRequest.decode(UNMAP.pack(24, 2, 0, 0))
    assert message.unmap_all


def test_larger_argsz_is_accepted() -> None:
    assert DmaUnmapRequest.decode(UNMAP.pack(32, 0, 0, 4096) + bytes(8)).argsz == 32


@pytest.mark.parametrize(
    "body",
    [
        UNMAP.pack(24, 4, 0, 4096),             # unknown flag
        UNMAP.pack(24, 0x80000000, 0, 4096),
        UNMAP.pack(24, 1, 0, 4096),             # GET_DIRTY_BITMAP: no migration here
        UNMAP.pack(24, 3, 0, 0),
        UNMAP.pack(24, 2, 0x1000, 0),           # UNMAP_ALL with an address
        UNMAP.pack(24, 2, 0, 0x1000),           # ... or a size
        UNMAP.pack(23, 0, 0, 4096),             # argsz too small
        UNMAP.pack(24, 0, 0, 4096)[:20],        # short body
        UNMAP.pack(24, 0, 2**64 - 1, 2),        # wraps
    ],
)
def test_case43_invalid(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        DmaUnmapRequest.decode(body)
    assert info.value.errno == EINVAL
    assert bad(ready_server(), frame(1, Command.DMA_UNMAP, body)).errno == EINVAL


def test_fds_are_refused_and_closed(eventfds: EventFds) -> None:
    (fd,) = eventfds(1)
    event = bad(ready_server(), frame(1, Command.DMA_UNMAP, UNMAP.pack(24, 0, 0, 4096)), [fd])
    assert event.errno == EINVAL and is_closed(fd)

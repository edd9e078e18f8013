"""Helpers for the protocol tests: plain bytes in, events out."""

from __future__ import annotations

import os
from collections.abc import Callable

from vmsi_server.protocol import (
    QEMU_CAPABILITIES_JSON,
    BadRequest,
    ClientConnection,
    DmaLayout,
    Event,
    ServerConnection,
    ServerLimits,
    VersionNegotiated,
    VersionRequest,
    encode_frame,
)


def drain(conn: ServerConnection | ClientConnection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def feed(conn: ServerConnection | ClientConnection, data: bytes | bytearray | memoryview,
         fds: list[int] | tuple[int, ...] = ()) -> list[Event]:
    conn.receive_data(data, fds)
    return drain(conn)


def one(conn: ServerConnection | ClientConnection, data: bytes | bytearray | memoryview,
        fds: list[int] | tuple[int, ...] = ()) -> Event:
    events = feed(conn, data, fds)
    assert len(events) == 1, events
    return events[0]


def bad(conn: ServerConnection | ClientConnection, data: bytes,
        fds: list[int] | tuple[int, ...] = ()) -> BadRequest:
    event = one(conn, data, fds)
    assert isinstance(event, BadRequest), event
    return event


def ready_server(limits: ServerLimits | None = None, caps: str = QEMU_CAPABILITIES_JSON,
                 layout: DmaLayout = DmaLayout.QEMU) -> ServerConnection:
    server = ServerConnection(limits, dma_layout=layout)
    event = one(server, encode_frame(0, VersionRequest(0, 0, caps)))
    assert isinstance(event, VersionNegotiated), event
    return server


def connected_pair(layout: DmaLayout = DmaLayout.QEMU,
                   limits: ServerLimits | None = None) -> tuple[ServerConnection, ClientConnection]:
    """A server and a client that went through VERSION with each other."""
    server = ServerConnection(limits, dma_layout=layout)
    client = ClientConnection(dma_layout=layout)
    data, fds, _ = client.request(client.version_request())
    event = one(server, data, fds)
    assert isinstance(event, VersionNegotiated)
    reply, rfds = server.reply(event.header, event.reply)
    one(client, reply, rfds)
    return server, client


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


EventFds = Callable[[int], list[int]]
"""Type of the ``eventfds`` fixture: make n real eventfds."""

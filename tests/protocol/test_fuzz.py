"""Arbitrary bytes never make a connection raise: they only produce clean events.

A seeded random fuzzer (always available); ``test_fuzz_hypothesis.py`` adds a
hypothesis-driven one when hypothesis is installed.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from vmsi_server.protocol import (
    QEMU_CAPABILITIES_JSON,
    BadRequest,
    ClientConnection,
    ConnectionClosed,
    ReplyReceived,
    Request,
    ServerConnection,
    UnexpectedReply,
    VersionNegotiated,
    VersionRequest,
    encode_frame,
)

from .helpers import drain, ready_server

EVENT_TYPES = (Request, VersionNegotiated, BadRequest, ReplyReceived, UnexpectedReply,
               ConnectionClosed)
COMMANDS = [*range(20), 0xFFFF]


def _valid_body(rng: random.Random) -> tuple[int, bytes]:
    """A well-formed request body with random field values (may still be refused)."""
    u32 = rng.randrange(0, 1 << 32)
    choice = rng.randrange(8)
    if choice == 0:
        return 9, struct.pack("<QII", rng.randrange(0, 1 << 64), rng.randrange(0, 10),
                              rng.choice([1, 2, 4, 8, u32]))
    if choice == 1:
        count = rng.choice([0, 1, 4, 8])
        return 10, struct.pack("<QII", rng.randrange(0, 1 << 16), 0, count) + rng.randbytes(count)
    if choice == 2:
        return 2, struct.pack("<IIQQQ", 32, rng.randrange(0, 4), 0, rng.randrange(0, 1 << 40),
                              rng.randrange(0, 1 << 30))
    if choice == 3:
        return 3, struct.pack("<IIQQ", 24, rng.choice([0, 2]), 0, 0)
    if choice == 4:
        count = rng.randrange(0, 4)
        flags = rng.choice([0x24, 0x21, 0x09, 0x11, 0x14, 0x22, rng.randrange(0, 64)])
        data = rng.randbytes(count) if flags & 2 else b""
        return 8, struct.pack("<IIIII", 20 + len(data), flags, rng.randrange(0, 5),
                              rng.randrange(0, 3), count) + data
    if choice == 5:
        n = rng.randrange(0, 4)
        return 15, struct.pack("<Q", n) + b"".join(
            struct.pack("<QII8s", rng.randrange(0, 4096), 0, rng.randrange(0, 10), b"")
            for _ in range(n))
    if choice == 6:
        return rng.choice([4, 7]), struct.pack("<IIII", rng.choice([16, 32, 8]), 0,
                                               rng.randrange(0, 10), 0)
    return 5, struct.pack("<IIIIQQ", rng.choice([32, 64, 16]), 0, rng.randrange(0, 10), 0, 0, 0)


def _random_message(rng: random.Random) -> bytes:
    """Valid messages, mutated ones, plausible headers with random bodies, and garbage."""
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randrange(0, 40))
    if kind < 0.6:
        command, body = _valid_body(rng)
        if kind < 0.3 and body:
            mutable = bytearray(body)
            for _ in range(rng.randrange(1, 3)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
            body = bytes(mutable)
    else:
        command = rng.choice(COMMANDS)
        body = rng.randbytes(rng.choice([0, 4, 8, 12, 16, 20, 24, 32, rng.randrange(0, 300)]))
    size = 16 + len(body)
    if rng.random() < 0.01:
        size = rng.choice([0, 15, size + 1, size - 1, 0xFFFFFFFF])
    flags = rng.choice([0, 0, 0, 0, 0, 0x10, 0x1, 0x21, 0x2, rng.randrange(0, 256)])
    return struct.pack("<HHIII", rng.randrange(0, 8), command, size & 0xFFFFFFFF,
                       flags, rng.choice([0, 0, 22])) + body


def _feed_in_pieces(conn: ServerConnection | ClientConnection, stream: bytes,
                    rng: random.Random, fds_pool: list[int] | None = None) -> list[object]:
    events: list[object] = []
    pos = 0
    while pos < len(stream):
        step = rng.randrange(1, 200)
        fds: list[int] = []
        if fds_pool is not None and rng.random() < 0.2:
            fds = [os.eventfd(0) for _ in range(rng.randrange(1, 4))]
            fds_pool.extend(fds)
        conn.receive_data(stream[pos:pos + step], fds)
        pos += step
        events.extend(drain(conn))
    return events


def _own_fds(events: list[object]) -> list[int]:
    out: list[int] = []
    for event in events:
        if isinstance(event, Request):
            out.extend(event.message.attached_fds())
        elif isinstance(event, ReplyReceived):
            out.extend(event.fds)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    stream = b"".join(_random_message(rng) for _ in range(60))
    for conn in (ServerConnection(), ready_server(), ClientConnection()):
        if isinstance(conn, ClientConnection):
            conn.request(conn.version_request())
        events = _feed_in_pieces(conn, stream, rng)
        assert all(isinstance(e, EVENT_TYPES) for e in events)
        conn.receive_data(b"")
        tail = drain(conn)
        assert all(isinstance(e, EVENT_TYPES) for e in tail)
        if tail:  # a connection still open at EOF reports it
            assert isinstance(tail[-1], ConnectionClosed)


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("seed", range(10))
def test_random_streams_with_fds_leak_nothing(seed: int) -> None:
    rng = random.Random(1000 + seed)
    before = _open_fd_count()
    version = encode_frame(0, VersionRequest(0, 0, QEMU_CAPABILITIES_JSON))
    stream = version + b"".join(_random_message(rng) for _ in range(80))
    server = ServerConnection()
    pool: list[int] = []
    events = _feed_in_pieces(server, stream, rng, pool)
    server.close()
    for fd in _own_fds(events):  # what was handed out is ours to close
        os.close(fd)
    assert _open_fd_count() == before

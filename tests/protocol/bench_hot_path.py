"""Timing of the protocol hot path (not a test; run: ``python -m tests.protocol.bench_hot_path``
from the repository root, or ``PYTHONPATH=. python tests/protocol/bench_hot_path.py``).

Prints the best of many repeats (the machines are shared and noisy), next to a
calibration line: building a plain 3-field slotted object, so numbers from different
machines can be compared.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from vmsi_server.protocol import (
    ClientConnection,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    Request,
    ServerConnection,
    VersionNegotiated,
)


class _Plain:
    __slots__ = ("a", "b", "c")

    def __init__(self, a: int, b: int, c: int) -> None:
        self.a, self.b, self.c = a, b, c


def _best(fn: Callable[[], object], number: int = 2000, repeat: int = 200) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main() -> None:
    server, client = ServerConnection(), ClientConnection()
    data, fds, _ = client.request(client.version_request())
    server.receive_data(data, fds)
    event = server.next_event()
    assert isinstance(event, VersionNegotiated)
    client.receive_data(server.reply(event.header, event.reply)[0])
    client.next_event()

    read, _, _ = client.request(RegionReadRequest(0x10, 7, 4))
    write, _, _ = client.request(RegionWriteRequest(0x10, 0, 4, b"abcd"), no_reply=True)
    payload = b"\1\2\3\4"

    def read_round() -> tuple[bytes, list[int]]:
        server.receive_data(read)
        ev = server.next_event()
        assert isinstance(ev, Request)
        m = ev.message
        assert isinstance(m, RegionReadRequest)
        return server.reply(ev.header, RegionReadReply(m.offset, m.region, m.count, payload))

    def posted_write() -> object:
        server.receive_data(write)
        return server.next_event()

    rows = [
        ("calibration: 3-field slotted object", lambda: _Plain(1, 2, 3)),
        ("REGION_READ: receive + decode + reply encode", read_round),
        ("posted REGION_WRITE: receive + decode", posted_write),
    ]
    for name, fn in rows:
        print(f"{_best(fn) * 1e6:7.2f} us  {name}")


if __name__ == "__main__":
    main()

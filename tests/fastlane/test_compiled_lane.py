"""The compiled lane answers exactly what the Python path answers, and counts it.

Each test drives a real Session over a real socketpair, once on an EventLoop
with the lane and once without, with the same bytes, and compares the replies,
the device's state and the counters. The lane must change who answers, never
what is answered.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsi_server import fastlane
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.msix.slowpath import SlowPath
from vmsi_server.nic import registers as reg
from vmsi_server.nic.pf import Pf
from vmsi_server.nic.vf_function import Igb82576Vf
from vmsi_server.protocol.connection import ClientConnection
from vmsi_server.protocol.constants import NO_REPLY, Command, MessageType, RegionIndex
from vmsi_server.session import Session
from vmsi_server.telemetry.counters import Counters
from vmsi_server.transport.loop import EventLoop

READ, WRITE = int(Command.REGION_READ), int(Command.REGION_WRITE)
CONFIG, BAR0, BAR3 = int(RegionIndex.CONFIG), 0, 3
PBA = 0x2000
_ACCESS = struct.Struct("<HHIIIQII")


def read(msg_id: int, region: int, offset: int, count: int, flags: int = 0) -> bytes:
    return _ACCESS.pack(msg_id, READ, 32, flags, 0, offset, region, count)


def write(msg_id: int, region: int, offset: int, data: bytes, flags: int = NO_REPLY) -> bytes:
    return _ACCESS.pack(msg_id, WRITE, 32 + len(data), flags, 0, offset, region, len(data)) + data


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def test_the_lane_is_built() -> None:
    """`make setup` builds it; the suite must not quietly test only the Python path."""
    assert fastlane.available(), fastlane.unavailable_reason()


def test_wire_constants_match_the_protocol_layer() -> None:
    source = (Path(fastlane.__file__).parent / "lane.c").read_text()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)", source, re.MULTILINE))
    assert int(defines["CMD_REGION_READ"], 0) == READ
    assert int(defines["CMD_REGION_WRITE"], 0) == WRITE
    assert int(defines["FLAG_REPLY"], 0) == int(MessageType.REPLY)
    assert int(defines["FLAG_NO_REPLY"], 0) == NO_REPLY
    assert int(defines["ACCESS_SIZE"], 0) == _ACCESS.size


@dataclass
class Outcome:
    replies: bytes
    config: bytes
    table: tuple[int, ...]
    counts: dict[int, int]
    errors: dict[int, int]
    msix: list[dict[str, object]]
    served_by_lane: int


class Rig:
    """A VF behind a Session on a socketpair; ``send`` feeds bytes, ``replies`` collects."""

    def __init__(self, lane: bool, policy: PathPolicy) -> None:
        self.loop = EventLoop(fast_lane=lane)
        assert (self.loop.lanes is not None) == lane
        counters = Counters()
        # Without a device model every access is fast; legacy needs one to forward to.
        self.slow_path = None
        if policy is not PathPolicy.SHADOW:
            self.slow_path = SlowPath(timeout=2.0, counters=counters)
            self.slow_path.start()
        self.vf = Igb82576Vf(Pf(1), 0, self.loop, policy=policy, slow_path=self.slow_path,
                             counters=counters)
        ours, self.peer = socket.socketpair()
        self.session = Session(ours, self.vf, self.loop)
        self.session.start()
        self.peer.settimeout(2.0)
        client = ClientConnection()
        self.peer.sendall(client.request(client.version_request())[0])
        self.loop.run_once(1.0)
        self.peer.recv(4096)
        self.replies = bytearray()

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if fds:
            socket.send_fds(self.peer, [data], list(fds))
        else:
            self.peer.sendall(data)
        self.loop.run_once(0.2)
        self.peer.setblocking(False)
        try:
            while chunk := self.peer.recv(65536):
                self.replies += chunk
        except BlockingIOError:
            pass
        finally:
            self.peer.setblocking(True)
            self.peer.settimeout(2.0)

    def outcome(self) -> Outcome:
        lane = self.session._lane
        snap = self.vf.counters.snapshot()
        return Outcome(
            bytes(self.replies), bytes(self.vf.config.buffer), tuple(self.vf.msix._dwords),
            dict((k, self.session.counters.count(k)) for k in (READ, WRITE)),
            dict(self.session.counters.errors),
            [{k: a[k] for k in ("region", "kind", "path", "count")} for a in snap["accesses"]],
            lane.served_reads if lane is not None else 0,
        )

    def close(self) -> None:
        self.session.close("test over")
        self.peer.close()
        self.vf.close()
        if self.slow_path is not None:
            self.slow_path.close()
        self.loop.close()


@contextmanager
def rig(lane: bool, policy: PathPolicy = PathPolicy.SHADOW) -> Iterator[Rig]:
    r = Rig(lane, policy)
    try:
        yield r
    finally:
        r.close()


def script() -> Iterator[bytes]:
    """MSI-X set-up as Linux does it, then reads of every window, edge cases among them."""
    yield write(1, CONFIG, 0x04, (0x0006).to_bytes(2, "little"))  # memory + bus master
    yield write(2, CONFIG, 0x72, (0xC000).to_bytes(2, "little"))  # MSI-X enable, masked
    for v in range(3):
        yield write(3 + v, BAR3, v * 16 + 12, u32(1))
    yield read(10, CONFIG, 0, 4)  # vendor/device
    yield read(11, CONFIG, 0x70, 12)  # the MSI-X capability, unaligned length
    yield read(12, CONFIG, 0xFFD, 3)  # the last bytes of config space
    yield read(13, CONFIG, 0xFFE, 4)  # beyond it: an error, from Python
    yield write(14, BAR3, 0x10, struct.pack("<IIII", 0xFEE01000, 0, 0x41, 0))  # 16 bytes: refused
    yield write(29, BAR3, 0x10, struct.pack("<II", 0xFEE01000, 0))
    yield write(30, BAR3, 0x18, u32(0x41))
    yield read(15, BAR3, 0x10, 8)  # address QWORD
    yield read(16, BAR3, 0x18, 4)  # data
    yield read(17, BAR3, 0x1C, 4)  # vector control
    yield read(18, BAR3, 0x12, 4)  # misaligned: an error, from Python
    yield read(19, BAR3, 0x10, 2)  # wrong size: an error, from Python
    yield read(20, BAR3, PBA, 8)
    yield read(21, BAR3, 0x1000, 4)  # BAR3 between table and PBA: zeros, from Python
    yield read(22, BAR0, reg.STATUS, 4)  # a NIC register: Python
    # A burst in one send: read, posted write, read; the lane serves it in order.
    yield read(23, BAR3, 0x1C, 4) + write(24, BAR3, 0x1C, u32(0)) + read(25, BAR3, 0x1C, 4)
    # A read split over two sends: the first half waits in Python's buffer.
    whole = read(26, CONFIG, 0x2C, 4)
    yield whole[:20]
    yield whole[20:]
    yield read(27, CONFIG, 0, 4, flags=NO_REPLY)  # a posted read: never answered
    yield read(28, CONFIG, 0x100, 0)  # zero count


@pytest.mark.parametrize("policy", [PathPolicy.SHADOW, PathPolicy.LEGACY])
def test_lane_answers_and_counts_like_the_python_path(policy: PathPolicy) -> None:
    outcomes = []
    for lane in (True, False):
        with rig(lane, policy) as r:
            for data in script():
                r.send(data)
            outcomes.append(r.outcome())
    with_lane, without = outcomes
    assert with_lane.replies == without.replies
    assert with_lane.config == without.config and with_lane.table == without.table
    assert with_lane.counts == without.counts
    assert with_lane.errors == without.errors
    assert with_lane.msix == without.msix
    assert without.served_by_lane == 0
    # Config reads 10, 11, 12 and 28 always; table reads 15, 16, 17, 23, 25 and
    # PBA read 20 only where they stay on the fast path (legacy forwards them).
    assert with_lane.served_by_lane == (10 if policy is PathPolicy.SHADOW else 4)


def test_a_message_carrying_fds_goes_to_python_which_closes_them() -> None:
    r_fd, w_fd = os.pipe()
    try:
        with rig(True) as r:
            r.send(read(1, CONFIG, 0, 4), fds=(r_fd,))
            # Refused (a REGION_READ takes no fds); the fd was closed by the server.
            assert r.session.counters.errors.get(READ) == 1
            assert r.session._lane is not None and r.session._lane.served_reads == 0
            r.send(read(2, CONFIG, 0, 4))
            assert r.session._lane.served_reads == 1
    finally:
        os.close(r_fd)
        os.close(w_fd)


def test_the_lane_waits_for_version() -> None:
    loop = EventLoop(fast_lane=True)
    vf = Igb82576Vf(Pf(1), 0, loop)
    ours, peer = socket.socketpair()
    session = Session(ours, vf, loop)
    session.start()
    try:
        peer.sendall(read(1, CONFIG, 0, 4))
        loop.run_once(1.0)
        assert session.closed  # a request before VERSION is a protocol error
        assert session.counters.count(READ) == 0
    finally:
        session.close("test over")
        peer.close()
        vf.close()
        loop.close()


def test_client_eof_seen_by_the_lane_closes_the_session() -> None:
    with rig(True) as r:
        r.send(read(1, CONFIG, 0, 4))
        r.peer.shutdown(socket.SHUT_WR)
        r.loop.run_once(1.0)
        assert r.session.closed


def test_served_reads_reach_the_counters_of_a_snapshot() -> None:
    with rig(True, PathPolicy.SHADOW) as r:
        for data in list(script())[:5]:
            r.send(data)
        before = r.session.counters.count(READ)
        for i in range(50):
            r.send(read(100 + i, BAR3, 0x0C, 4))
        assert r.session.counters.count(READ) == before + 50
        assert r.vf.counters.access_count("msix-table", "read-control", "fast") == 50


def test_fast_lane_off_means_no_compiled_code_in_the_vf() -> None:
    loop = EventLoop(fast_lane=False)
    try:
        python_vf = Igb82576Vf(Pf(1), 0, loop, compiled=False)
        default_vf = Igb82576Vf(Pf(1), 0, loop)
        assert python_vf.rx.checksum is None and python_vf.rx.fast is None
        assert python_vf.tx.fast is None
        assert default_vf.rx.checksum is not None  # built: the RX checksum check is on
        python_vf.close()
        default_vf.close()
    finally:
        loop.close()

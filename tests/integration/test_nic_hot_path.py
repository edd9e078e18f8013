"""The VF's compiled hot path (``fastlane/vf.c``) against the Python path, through a
real server and a real tap.

Each scenario runs twice: ``--fast-lane on`` (TDT/RDT/EIMS/EICS writes and tap
wake-ups served in C, on the Python objects' own state) and ``--fast-lane off``
(all Python). The frames on the wire, the guest memory, the registers, the NIC
counters and the eventfd counts must be the same; the lane's own counters must
show that C, not Python, served the writes. What C hands back to Python (an
EITR hold-back, a masked vector, a full ring) is covered by its own scenario.

Needs root and /dev/net/tun (network namespaces); skipped otherwise.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsi_server import fastlane
from vmsi_server.client.client import VfioUserClient, read_eventfd
from vmsi_server.nic import registers as r
from vmsi_server.nic.descriptors import TXD_CMD_EOP, TXD_CMD_RS

from .test_nic_bad_input import (
    CONFIG,
    ETH_P_TEST,
    PEER_MAC,
    RX_BUF,
    RX_BUFLEN,
    RX_RING,
    TX_BUF,
    VF_MAC,
    Capture,
    Driver,
    NsServer,
    eth_frame,
    inject,
    ns_server_running,
    pytestmark,  # noqa: F401  (root, /dev/net/tun, iproute2)
)

MSIX_CONTROL = 0x72
MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
FRAMES = 6
NOISE = ("rx_wakeups", "drop.rx_disabled", "drop.rx_filtered")
"""Counters the scenarios do not decide: wake-ups batch differently, and the tap's own
link-up traffic (IPv6 solicitations, before the test turns IPv6 off) may arrive while
RX is off or be filtered as multicast, in either run."""


@dataclass
class Outcome:
    wire: list[bytes]
    ram: bytes
    registers: dict[str, int]
    nic: dict[str, int]
    eventfds: list[int]
    lane: dict[str, int] | None


@contextmanager
def driven(tmp_path: Path, compiled: bool) -> Iterator[tuple[NsServer, Driver]]:
    extra = ("--fast-lane", "on" if compiled else "off")
    run_dir = tmp_path / ("on" if compiled else "off")
    run_dir.mkdir()
    with (ns_server_running(run_dir, extra=extra) as server,
          VfioUserClient(server.socket_path, timeout=10.0) as client):
        drv = Driver(client)
        drv.bring_up()
        try:
            yield server, drv
        finally:
            for fd in drv.irq_fds:
                os.close(fd)


def settle(drv: Driver) -> None:
    """A synchronous read: every posted write before it has been applied."""
    assert drv.c.read32(CONFIG, 0) == 0x10CA8086


def counts(drv: Driver) -> list[int]:
    return [read_eventfd(fd) for fd in drv.irq_fds]


def outcome(server: NsServer, drv: Driver, wire: list[bytes], eventfds: list[int]) -> Outcome:
    regs = {name: drv.rd(off) for name, off in (
        ("TDH", r.TDH0), ("TDT", r.TDT0), ("RDH", r.RDH0), ("RDT", r.RDT0), ("EIMS", r.EIMS))}
    snap = server.counters()
    nic = {k: v for k, v in snap["devices"]["vf0"]["nic"].items() if k not in NOISE}
    return Outcome(wire, bytes(drv.ram.mem), regs, nic, eventfds,
                   snap["devices"]["vf0"].get("fast_lane"))


Scenario = Callable[[NsServer, Driver], Outcome]


def run_both(tmp_path: Path, scenario: Scenario) -> tuple[Outcome, Outcome]:
    """The scenario's outcome with the hot path, then without."""
    if not fastlane.available():
        pytest.skip(fastlane.unavailable_reason() or "fast lane not built")
    results = []
    for compiled in (True, False):
        with driven(tmp_path, compiled) as (server, drv):
            results.append(scenario(server, drv))
    return results[0], results[1]


def both(tmp_path: Path, scenario: Scenario) -> tuple[Outcome, Outcome]:
    """``run_both``, holding the two runs to the same outcome."""
    c, py = run_both(tmp_path, scenario)
    assert c.wire == py.wire
    assert c.ram == py.ram
    assert c.registers == py.registers
    assert c.nic == py.nic
    assert c.eventfds == py.eventfds
    return c, py


def tx_scenario(server: NsServer, drv: Driver) -> Outcome:
    """igbvf's rhythm: one doorbell per packet, EIMS re-arm after each message."""
    drv.tx_ring()
    frames = [eth_frame(bytes([i]) * (60 + 7 * i)) for i in range(FRAMES)]
    for i, frame in enumerate(frames):
        drv.put(TX_BUF + 0x800 * i, frame)
        drv.tx_desc(i, TX_BUF + 0x800 * i, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    cap = Capture(server, FRAMES)
    fired = []
    for i in range(FRAMES):
        drv.wr(r.TDT0, i + 1)
        settle(drv)
        fired.append(counts(drv)[0])
        drv.wr(r.EIMS, 0x1)  # the handler's re-arm: nothing pending, nothing sent
    # Two packets before one re-arm: one message (auto-mask), the EIMS sends the second.
    drv.tx_desc(FRAMES, TX_BUF, len(frames[0]), TXD_CMD_EOP | TXD_CMD_RS)
    drv.tx_desc(FRAMES + 1, TX_BUF, len(frames[0]), TXD_CMD_EOP | TXD_CMD_RS)
    drv.wr(r.TDT0, FRAMES + 1)
    drv.wr(r.TDT0, FRAMES + 2)
    settle(drv)
    fired.append(counts(drv)[0])
    drv.wr(r.EICS, 0x4)  # software-raised "other" cause: vector 2
    drv.wr(r.EIMS, 0x1)
    settle(drv)
    fired += counts(drv)
    wire = cap.frames()
    return outcome(server, drv, wire, fired)


def test_tx_doorbells_and_their_interrupts_are_served_in_c(tmp_path: Path) -> None:
    c, py = both(tmp_path, tx_scenario)
    assert len(c.wire) == FRAMES  # the capture stops at FRAMES; the rest is counted
    assert c.nic["gptc"] == FRAMES + 2
    assert c.eventfds == [1] * FRAMES + [1, 1, 0, 1]
    assert c.lane is not None and py.lane is None
    # every TDT, EIMS and EICS write above: 8 + 6 + 2 + 1, and the bring-up's EIMS
    assert c.lane["device_writes"] >= 17
    assert c.lane["posted_to_python"] < c.lane["device_writes"]


def rx_ring(drv: Driver, count: int = 16) -> None:
    drv.rx_ring(count=count)
    for i in range(count):
        drv.put(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + 2 * RX_BUFLEN * i, 0))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def rx_scenario(server: NsServer, drv: Driver) -> Outcome:
    """Frames from the namespace fill a 4-slot window; the ring fills, the tap holds
    the rest until the RDT write that gives buffers back."""
    rx_ring(drv)
    drv.wr(r.RDT0, 4)
    frames = [VF_MAC + PEER_MAC + struct.pack(">H", ETH_P_TEST) + bytes([i]) * (50 + i)
              for i in range(FRAMES)]
    inject(server, *frames)
    wait_for(lambda: drv.rd(r.RDH0) == 4)
    fired = [counts(drv)[1]]
    time.sleep(0.2)  # the tap still holds two frames: nothing may move
    assert drv.rd(r.RDH0) == 4
    drv.wr(r.EIMS, 0x2)  # NAPI done: re-arm
    drv.wr(r.RDT0, 12)  # refill: the held frames come in now
    wait_for(lambda: drv.rd(r.RDH0) == FRAMES)
    fired.append(counts(drv)[1])
    return outcome(server, drv, [], fired)


def test_rx_ring_fill_and_refill_are_served_in_c(tmp_path: Path) -> None:
    c, _ = both(tmp_path, rx_scenario)
    assert c.nic["gprc"] == FRAMES and c.nic["rx_ring_full"] == 1
    assert c.eventfds == [1, 1]
    assert c.lane is not None and c.lane["device_writes"] >= 3  # RDT, EIMS, RDT


def masked_scenario(server: NsServer, drv: Driver) -> Outcome:
    """MSI-X Function Mask: the completion pends (PBA), the unmask delivers it once."""
    drv.tx_ring()
    frame = eth_frame(b"m" * 60)
    drv.put(TX_BUF, frame)
    drv.tx_desc(0, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    drv.c.region_write(CONFIG, MSIX_CONTROL, struct.pack("<H", MSIX_ENABLE | MSIX_FUNCTION_MASK))
    drv.wr(r.TDT0, 1)
    settle(drv)
    fired = [counts(drv)[0]]
    pba = drv.c.region_read(3, 0x2000, 8)
    drv.c.region_write(CONFIG, MSIX_CONTROL, struct.pack("<H", MSIX_ENABLE))
    settle(drv)
    fired += [counts(drv)[0], int.from_bytes(pba, "little")]
    return outcome(server, drv, [], fired)


def test_a_masked_vector_pends_and_is_delivered_on_unmask(tmp_path: Path) -> None:
    c, _ = both(tmp_path, masked_scenario)
    assert c.eventfds == [0, 1, 0x1]


def eitr_scenario(server: NsServer, drv: Driver) -> Outcome:
    """EITR holds the second message back; the timer (Python's) sends it."""
    drv.wr(r.EITR0, r.EITR_INTERVAL_MASK)  # ~8.4 ms between messages of vector 0
    drv.tx_ring()
    frame = eth_frame(b"e" * 60)
    drv.put(TX_BUF, frame)
    for i in range(2):
        drv.tx_desc(i, TX_BUF, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    # Packet, re-arm, packet: posted back to back, well inside one interval.
    drv.wr(r.TDT0, 1)
    drv.wr(r.EIMS, 0x1)
    drv.wr(r.TDT0, 2)
    settle(drv)
    fired = [counts(drv)[0], server.nic()["irq.deferred.0"]]
    time.sleep(0.1)
    settle(drv)
    fired.append(counts(drv)[0])
    return outcome(server, drv, [], fired)


def test_an_eitr_hold_back_goes_to_the_python_timer(tmp_path: Path) -> None:
    c, _ = both(tmp_path, eitr_scenario)
    assert c.eventfds == [1, 1, 1]  # sent, held back, then sent by the timer
    assert c.nic["irq.sent.0"] == 2 and c.nic["irq.deferred.0"] == 1


def lane_writes(server: NsServer) -> int:
    lane = server.counters()["devices"]["vf0"].get("fast_lane") or {}
    return int(lane.get("device_writes", 0))


def dma_scenario(server: NsServer, drv: Driver) -> Outcome:
    """Memory going away (DMA_UNMAP, bus mastering off) stops the hot path before it
    touches guest memory; memory coming back (DMA_MAP, bus mastering on) resumes it."""
    drv.tx_ring()
    frame = eth_frame(b"d" * 60)
    for i in range(3):
        drv.put(TX_BUF + 0x800 * i, frame)
        drv.tx_desc(i, TX_BUF + 0x800 * i, len(frame), TXD_CMD_EOP | TXD_CMD_RS)
    drv.wr(r.TDT0, 1)
    settle(drv)
    ram = drv.ram
    drv.c.dma_unmap(ram.iova, ram.size)
    drv.wr(r.TDT0, 2)  # the ring is gone: dropped, TDH stays
    settle(drv)
    stuck = [drv.rd(r.TDH0)]
    drv.c.dma_map(ram.iova, ram.size, os.dup(ram.fd))
    drv.wr(r.TDT0, 2)  # the same tail again, now with memory
    settle(drv)
    drv.c.region_write(CONFIG, 0x04, struct.pack("<H", 0x0002))  # memory on, bus master off
    drv.wr(r.TDT0, 3)
    settle(drv)
    stuck.append(drv.rd(r.TDH0))
    drv.c.region_write(CONFIG, 0x04, struct.pack("<H", 0x0006))
    before = lane_writes(server)
    drv.wr(r.TDT0, 3)
    settle(drv)
    served_in_c = lane_writes(server) - before
    return outcome(server, drv, [], [*stuck, *counts(drv), served_in_c])


def test_dma_going_away_and_coming_back(tmp_path: Path) -> None:
    """The last doorbell is C's again only in the compiled run: both runs agree on
    everything but that count, so it is compared apart."""
    c, py = run_both(tmp_path, dma_scenario)
    *c_fired, c_served = c.eventfds
    *py_fired, py_served = py.eventfds
    assert c_fired == py_fired and c.ram == py.ram and c.registers == py.registers
    assert c.nic == py.nic
    assert c_fired[:2] == [1, 2]  # TDH held while unmapped, and without bus mastering
    assert c.registers["TDH"] == 3 and c.nic["gptc"] == 3
    assert c.nic["drop.tx_ring_dma"] == 1 and c.nic["drop.tx_no_memory"] == 1
    assert (c_served, py_served) == (1, 0)

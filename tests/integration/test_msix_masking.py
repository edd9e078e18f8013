"""MSI-X mask bits and pending bits through the protocol, as a guest drives them.

Runs on every backend (see backends.py), so the engine's compiled lane, which
applies mask writes and answers table and PBA reads in C, is held to exactly
what the Python path does: a masked vector that fires sets its PBA bit and
writes no eventfd; unmasking it delivers once and clears the bit; unmasking a
vector with nothing pending delivers nothing.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from vmsi_server.client.client import read_eventfd
from vmsi_server.msix.layout import VECTOR_CONTROL_MASKBIT, EntryField
from vmsi_server.nic import registers as reg
from vmsi_server.pci.igbvf_layout import IGBVF_MSIX_BAR, IGBVF_MSIX_PBA_OFFSET
from vmsi_server.replay.guest import SimulatedGuest
from vmsi_server.replay.model import GuestKernel
from vmsi_server.replay.stats import ReplayStats

from .backends import ENGINE
from .conftest import RunningServer


@pytest.fixture
def guest(server: RunningServer) -> Iterator[SimulatedGuest]:
    g = SimulatedGuest(0, server.socket_path, GuestKernel.LINUX_6, ReplayStats())
    try:
        g.setup()
        yield g
    finally:
        g.close()


def fired(fd: int, timeout: float = 0.5) -> int:
    """The eventfd's count once it is readable within ``timeout``, else 0."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return read_eventfd(fd) if ready else 0


def pba(guest: SimulatedGuest) -> int:
    return guest.client.read32(IGBVF_MSIX_BAR, IGBVF_MSIX_PBA_OFFSET)


def control(guest: SimulatedGuest, vector: int) -> int:
    return guest._table_read(vector, EntryField.VECTOR_CONTROL, flush=False)


def test_the_engine_lane_takes_the_mask_traffic(server: RunningServer, backend: str,
                                               guest: SimulatedGuest) -> None:
    """On the engine with its lane, the unmasks with nothing pending and the table
    reads never reach Python (the other tests check that this changes nothing)."""
    for _ in range(10):
        guest._mask(0)
        guest._unmask(0)
    lane = server.counters()["devices"]["vf0"]["fast_lane"]
    if backend != ENGINE:
        assert lane is None or lane["applied_writes"] == lane["served_reads"] == 0
        return
    assert lane["applied_writes"] >= 20
    assert lane["served_reads"] >= 10


def test_masked_vector_pends_and_unmask_delivers_once(guest: SimulatedGuest) -> None:
    fd = guest.eventfds[1]
    guest._mask(1)
    assert control(guest, 1) == VECTOR_CONTROL_MASKBIT
    guest.raise_interrupt(1)
    assert pba(guest) == 0b010  # the read comes after the posted EICS: it has landed
    assert fired(fd, 0.2) == 0
    guest._unmask(1)
    assert fired(fd) == 1
    assert pba(guest) == 0
    assert control(guest, 1) == 0
    assert fired(fd, 0.2) == 0  # once only


def test_unmask_with_nothing_pending_delivers_nothing(guest: SimulatedGuest) -> None:
    for _ in range(20):
        guest._mask(0)
        guest._unmask(0)
    assert control(guest, 0) == 0 and pba(guest) == 0
    assert fired(guest.eventfds[0], 0.2) == 0
    guest.raise_interrupt(0)  # still live after all that
    assert fired(guest.eventfds[0]) == 1


def test_only_the_mask_bit_of_vector_control_is_writable(guest: SimulatedGuest) -> None:
    guest._table_write(2, EntryField.VECTOR_CONTROL, 0xFFFF_FFFF)
    assert control(guest, 2) == VECTOR_CONTROL_MASKBIT
    guest._table_write(2, EntryField.VECTOR_CONTROL, 0xFFFF_FFFE)
    assert control(guest, 2) == 0


def test_delivery_follows_every_mask_change_of_a_burst(guest: SimulatedGuest) -> None:
    """Mask and unmask pairs interleaved with interrupts, each pair in one posted
    burst; every interrupt raised while masked is delivered exactly once."""
    fd = guest.eventfds[0]
    delivered = 0
    for _ in range(10):
        guest._table_write(0, EntryField.VECTOR_CONTROL, VECTOR_CONTROL_MASKBIT)
        guest.raise_interrupt(0)
        guest._table_write(0, EntryField.VECTOR_CONTROL, 0)
        guest._reg_write(reg.EIMS, 1)
        delivered += fired(fd)
    assert delivered == 10
    assert pba(guest) == 0
    os.close(os.dup(fd))  # the eventfd is still ours and open

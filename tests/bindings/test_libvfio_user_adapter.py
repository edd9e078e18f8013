"""The 82576 VF on libvfio-user keeps the project's MSI-X and DMA semantics.

Raw libvfio-user writes a vector's eventfd whatever the masks say and keeps no
PBA; these tests drive the VF over the socket and check that the adapter
routes every interrupt through the ``MsixController`` instead.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from bindings import libvfio_user as vfu
from bindings.adapter import LibvfioUserDevice
from vmsi_server.client.client import VfioUserClient, read_eventfd
from vmsi_server.dma.errors import DmaError
from vmsi_server.nic import registers as r
from vmsi_server.protocol.constants import IrqIndex, RegionIndex, SetIrqsFlags

CONTROL = 0x72  # MSI-X Message Control (capability at 0x70)
ENABLE = b"\x00\x80"
ENABLE_MASKED = b"\x00\xc0"
PBA = 0x2000
EVENTFD_TRIGGER = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER


def _raise(c: VfioUserClient, vector: int) -> None:
    """Make the device raise ``vector`` (EIMS then EICS, as a driver's self-test does)."""
    c.write32(RegionIndex.BAR0, r.EIMS, 1 << vector)
    c.write32(RegionIndex.BAR0, r.EICS, 1 << vector)


def _settled(c: VfioUserClient) -> None:
    """One round trip: eventfd changes of the previous message have reached the function.

    The adapter sees them in libvfio-user's table once the message is handled, i.e.
    after its reply went out but before the next message is read.
    """
    c.read32(RegionIndex.CONFIG, 0)


def _pba(c: VfioUserClient) -> int:
    return c.read32(RegionIndex.BAR3, PBA)


def _eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_function_mask_pends_and_unmask_delivers(served: Any) -> None:
    with served.client() as c:
        fds = c.install_msix_eventfds(3)
        c.region_write(RegionIndex.CONFIG, CONTROL, ENABLE_MASKED)
        _raise(c, 1)
        assert [read_eventfd(fd) for fd in fds] == [0, 0, 0]  # raw libvfio-user: [0, 1, 0]
        assert _pba(c) == 0b010
        c.region_write(RegionIndex.CONFIG, CONTROL, ENABLE)
        assert [read_eventfd(fd) for fd in fds] == [0, 1, 0]
        assert _pba(c) == 0
        for fd in fds:
            os.close(fd)


def test_pending_vector_goes_out_when_its_eventfd_arrives(served: Any) -> None:
    with served.client() as c:
        c.region_write(RegionIndex.CONFIG, CONTROL, ENABLE)
        _raise(c, 2)  # no eventfd yet: pending, not lost
        assert _pba(c) == 0b100
        fds = c.install_msix_eventfds(3)
        _settled(c)
        assert [read_eventfd(fd) for fd in fds] == [0, 0, 1]
        assert _pba(c) == 0
        counters = served.vf.counters.snapshot()["counters"]
        assert counters["qemu.eventfd_install"] == 1
        for fd in fds:
            os.close(fd)


def test_eventfd_swaps_are_seen_and_counted(served: Any) -> None:
    device = served.device
    assert isinstance(device, LibvfioUserDevice)
    with served.client() as c:
        fds = c.install_msix_eventfds(3)
        for _ in range(5):  # what QEMU does on every unmask
            new = os.eventfd(0, os.EFD_NONBLOCK)
            c.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 1, 1, [new])
            fds.append(new)
        _settled(c)
        assert device.irqs.swaps == 5
        assert device.irqs.assigned(IrqIndex.MSIX) == [0, 1, 2]
        counters = served.vf.counters.snapshot()["counters"]
        assert counters["qemu.eventfd_swap"] == 5
        c.region_write(RegionIndex.CONFIG, CONTROL, ENABLE)
        _raise(c, 1)
        assert read_eventfd(fds[-1]) == 1  # the current fd, not a closed one
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER, 0, 0)
        _settled(c)
        assert device.irqs.assigned(IrqIndex.MSIX) == []
        assert served.vf.counters.snapshot()["counters"]["qemu.eventfd_deassign"] == 1
        for fd in fds:
            os.close(fd)


def test_mask_and_unmask_actions_reach_the_controller(served: Any) -> None:
    with served.client() as c:
        fds = c.install_msix_eventfds(3)
        c.region_write(RegionIndex.CONFIG, CONTROL, ENABLE)
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_MASK, 0, 1)
        assert served.vf.msix.client_masked(0)
        _raise(c, 0)
        assert read_eventfd(fds[0]) == 0 and _pba(c) == 0b001
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_UNMASK, 0, 1)
        assert read_eventfd(fds[0]) == 1 and _pba(c) == 0
        for fd in fds:
            os.close(fd)


def test_guest_memory_comes_from_libvfio_users_mapping(served: Any) -> None:
    device = served.device
    assert isinstance(device, LibvfioUserDevice)
    lib = device.lib
    with served.client() as c:
        ram = c.map_ram(0x100000, 1 << 20)
        ram.write(0x100800, b"from the guest")
        assert device.memory.read(0x100800, 14) == b"from the guest"
        device.memory.write(0x100900, b"from the device")
        assert ram.read(0x100900, 15) == b"from the device"
        # The same bytes through the library's own scatter-gather API.
        sgl = ctypes.create_string_buffer(lib.dma_sg_size())
        assert lib.vfu_addr_to_sgl(device.ctx, 0x100800, 14, sgl, 1, 1) == 1
        iov = vfu.Iovec()
        assert lib.vfu_sgl_get(device.ctx, sgl, ctypes.byref(iov), 1, 0) == 0
        assert ctypes.string_at(iov.iov_base, 14) == b"from the guest"
        lib.vfu_sgl_put(device.ctx, sgl, ctypes.byref(iov), 1)
        c.dma_unmap(0x100000, 1 << 20)
        assert len(device.memory) == 0
        with pytest.raises(DmaError):
            device.memory.read(0x100800, 14)


def test_client_going_away_detaches_and_keeps_device_state(served: Any) -> None:
    device = served.device
    assert isinstance(device, LibvfioUserDevice)
    with served.client() as c:
        c.region_write(RegionIndex.CONFIG, 0x3C, b"\x2a")
        c.map_ram(0x100000, 1 << 16)
        c.install_msix_eventfds(3)
        assert served.vf.attached
    _eventually(lambda: not served.vf.attached)
    assert len(device.memory) == 0 and device.irqs.assigned(IrqIndex.MSIX) == []
    with served.client() as c:
        assert c.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x2a"
        c.reset()
        assert c.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x00"
    assert device.sessions_served == 2


def test_device_errors_become_error_replies(served: Any) -> None:
    from vmsi_server.client.client import ServerError

    with served.client() as c, pytest.raises(ServerError) as info:
        c.region_read(RegionIndex.BAR3, 0x2001, 2)  # PBA takes 4/8-byte aligned reads only
    assert info.value.errno == 22
    with served.client() as c:
        assert c.read32(RegionIndex.CONFIG, 0) == 0x10CA8086

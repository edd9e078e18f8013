"""GuestMap: compiled code's view of guest memory follows DMA_MAP/UNMAP at once."""

from __future__ import annotations

import os

import pytest

from vmsi_server import fastlane
from vmsi_server.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, GuestMemory

pytestmark = pytest.mark.skipif(not fastlane.available(), reason="fast lane not built")
RW = DMA_FLAG_READ | DMA_FLAG_WRITE


def memfd(size: int, fill: bytes) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    os.pwrite(fd, fill, 0)
    return fd


def test_the_map_points_at_the_guest_bytes_and_is_dropped_before_an_unmap() -> None:
    from vmsi_server.fastlane.guestmap import GuestMap

    mod = fastlane.module()
    memory = GuestMemory()
    memory.add(0x10000, 0x4000, memfd(0x4000, b"first"), 0, RW)
    memory.add(0x20000, 0x1000, memfd(0x1000, b"second"), 0, DMA_FLAG_READ)
    memory.add(0x30000, 0x1000, None, 0, RW)  # no fd: exists, never reachable
    gmap = GuestMap()
    assert gmap.load(memory)
    table = gmap.cdata
    assert table.n == 2
    ptr = mod.lib.vl_guest_ptr(table, 0x10000, 5, 1)
    assert mod.ffi.buffer(ptr, 5)[:] == b"first"
    assert mod.lib.vl_guest_ptr(table, 0x20000, 6, 1) == mod.ffi.NULL  # read-only map
    assert mod.ffi.buffer(mod.lib.vl_guest_ptr(table, 0x20000, 6, 0), 6)[:] == b"second"
    assert mod.lib.vl_guest_ptr(table, 0x13FFF, 2, 0) == mod.ffi.NULL  # runs off the end
    assert mod.lib.vl_guest_ptr(table, 0x30000, 1, 0) == mod.ffi.NULL  # fd-less
    memory.remove(0x10000, 0x4000)
    assert table.n == 0  # forgotten before the munmap ...
    assert memory.deferred_unmaps == 0  # ... so the munmap did not have to wait
    assert gmap.load(memory) and table.n == 1  # reloaded on the next use
    memory.close()
    assert memory.deferred_unmaps == 0

"""Guest memory for compiled code: host pointers of the server's own mmaps.

One ``GuestMap`` per device, shared by its compiled RX and TX loops. It is
rebuilt when a DMA_MAP or DMA_UNMAP changed the table (``GuestMemory.generation``)
and emptied before any unmap (``GuestMemory.on_unmap``), so that no munmap
has to wait for a pointer held here and no loop ever uses a stale one.
"""

from __future__ import annotations

from typing import Any

from vmsi_server import fastlane
from vmsi_server.dma.memory import GuestMemory


class GuestMap:
    def __init__(self) -> None:
        mod = fastlane.module()
        self._ffi = mod.ffi
        self.cdata: Any = self._ffi.new("struct vl_memmap *")
        self._capacity = len(self.cdata.maps)
        self._memory: GuestMemory | None = None
        self._generation = -1
        self._pins: list[Any] = []

    def forget(self) -> None:
        """Drop every pointer into guest memory (an unmap is coming)."""
        self.cdata.n = 0
        self._pins = []
        self._generation = -1

    def load(self, memory: GuestMemory) -> bool:
        """Bring the table up to date with ``memory``; False when compiled code must
        not touch it (a mapping that is not one of this server's own mmaps, or more
        mappings than the table holds): the caller then does the work in Python."""
        if memory is not self._memory:
            self.forget()
            self._memory = memory
            memory.on_unmap(self.forget)
        if self._generation == memory.generation:
            return True
        self.forget()
        ranges = memory.host_ranges()
        if ranges is None or len(ranges) > self._capacity:
            return False
        ffi, table = self._ffi, self.cdata
        for i, (iova, size, writable, view, index) in enumerate(ranges):
            pinned = ffi.from_buffer(view)
            self._pins.append(pinned)
            m = table.maps[i]
            m.iova, m.size, m.writable = iova, size, 1 if writable else 0
            m.host = ffi.cast("uint8_t *", pinned) + index
        table.n = len(ranges)
        self._generation = memory.generation
        return True


def set_ring(job: Any, base: int, n: int, head: int, tail: int) -> None:
    """The ring fields every compiled queue job starts from."""
    job.ring_base = base
    job.ring_n = n
    job.head = head
    job.tail = tail

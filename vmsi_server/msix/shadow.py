"""The fast path's shadow of the MSI-X table, with per-entry dirty bits.

What the 2010 Xen patch kept in the hypervisor: a copy of each entry's address
and data (here also Vector Control, whose mask bit the fast path owns), so
reads need not go to the device model, plus a dirty bit per entry.

* Validity: the 2015 Xen hardening tracked a validity bit per slot because
  Xen learnt the values only from the guest's writes, so never-written slots
  had to fall back to qemu-dm. This shadow is created with the power-on values
  (address/data 0, masked) and sees every write, so every field is valid from
  reset; there is no validity bitmap to get wrong.
* Dirty: an address/data write sets the entry's bit before it is written
  through to the slow path; the slow path's acknowledgement (or a replay of
  the whole shadow into a restarted worker) clears it. While it is set the
  entry's vector is not delivered: an unmask that follows an address change
  takes effect at the completion hook, never with a message the device model
  has not taken (Xen's "unmask after an address change" replay). With the
  synchronous write-through the hook runs before the write's reply, so the
  bit is only observable when a write-through failed and the restart could
  not replay.
"""

from __future__ import annotations

from vmsi_server.msix.table import MsixTable


class Shadow:
    __slots__ = ("dirty", "table")

    def __init__(self, vectors: int) -> None:
        self.table = MsixTable(vectors)
        self.dirty = 0
        """Bit n: entry n was written and the slow path has not acknowledged it."""

    def reset(self) -> None:
        self.table.reset()
        self.dirty = 0

    def write_dirty(self, offset: int, size: int, value: int) -> int:
        """Apply an address/data write and mark its entry dirty; returns the vector."""
        self.table.write(offset, size, value)
        vector = offset >> 4
        self.dirty |= 1 << vector
        return vector

    def acknowledge(self, vector: int) -> None:
        self.dirty &= ~(1 << vector)

    def acknowledge_all(self) -> None:
        self.dirty = 0

    def is_dirty(self, vector: int) -> bool:
        return bool(self.dirty >> vector & 1)

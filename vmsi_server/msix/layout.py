"""MSI-X table entry and PBA layout, as the PCI specification draws them.

One table entry (16 bytes, little endian)::

    offset  size  field
    0x0     4     Message Address (low)   bits 1:0 are 0 (dword aligned)
    0x4     4     Message Upper Address
    0x8     4     Message Data
    0xC     4     Vector Control          bit 0 = Mask Bit, bits 31:1 reserved (read 0)

Pending Bit Array: one bit per vector, in QWORDs (vector n is bit n % 64 of
QWORD n // 64). Read-only.

Software accesses both structures with aligned DWORD or QWORD accesses only;
a QWORD table access covers two DWORDs of one entry. The controller refuses
everything else with EINVAL (the spec leaves it undefined; refusing it makes a
client bug visible instead of silently half-applied).

This module imports nothing of the server, so the slow-path worker can use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ENTRY_SIZE = 16
DWORDS_PER_ENTRY = ENTRY_SIZE // 4
VECTOR_CONTROL_MASKBIT = 0x1
VECTOR_CONTROL_WRITABLE = VECTOR_CONTROL_MASKBIT
"""Only the mask bit is implemented; reserved bits read 0 and ignore writes."""

ACCESS_SIZES = (4, 8)


class EntryField(enum.IntEnum):
    """DWORD index within an entry (byte offset = 4 * value)."""

    ADDRESS_LO = 0
    ADDRESS_HI = 1
    DATA = 2
    VECTOR_CONTROL = 3


POWER_ON_ENTRY = (0, 0, 0, VECTOR_CONTROL_MASKBIT)
"""Every entry after reset: address and data 0, masked."""


def _overlap(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


@dataclass(frozen=True, slots=True)
class MsixGeometry:
    """Where the table and PBA live: what the MSI-X capability advertises."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError(f"MSI-X table size {self.vectors} outside 1..2048")
        if self.table_offset % 8 or self.pba_offset % 8:
            raise ValueError("table and PBA offsets must be QWORD aligned")
        if self.table_bar == self.pba_bar and _overlap(
            self.table_offset, self.table_size, self.pba_offset, self.pba_size
        ):
            raise ValueError("table and PBA overlap")

    @property
    def table_size(self) -> int:
        return self.vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    def in_table(self, region: int, offset: int) -> bool:
        return region == self.table_bar and 0 <= offset - self.table_offset < self.table_size

    def in_pba(self, region: int, offset: int) -> bool:
        return region == self.pba_bar and 0 <= offset - self.pba_offset < self.pba_size


IGBVF_GEOMETRY = MsixGeometry(vectors=3, table_bar=3, table_offset=0, pba_bar=3, pba_offset=0x2000)
"""82576 VF: 3 vectors, table at BAR3 + 0, PBA at BAR3 + 0x2000."""

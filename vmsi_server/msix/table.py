"""An MSI-X table as DWORDs: the one data structure both copies use.

The fast path's shadow and the slow-path worker's device-side copy are both a
``MsixTable``; keeping one implementation means they cannot disagree about
what a write does (only the mask bit of Vector Control is writable).

Offsets are relative to the table start and must already be validated
(aligned DWORD/QWORD inside the table): this class sits under the checks, on
the hot path.
"""

from __future__ import annotations

from array import array

from vmsi_server.msix.layout import (
    DWORDS_PER_ENTRY,
    POWER_ON_ENTRY,
    VECTOR_CONTROL_MASKBIT,
    VECTOR_CONTROL_WRITABLE,
    EntryField,
)

_CONTROL = EntryField.VECTOR_CONTROL.value


class MsixTable:
    """``vectors`` entries of four DWORDs, flat: dword ``4 * vector + field``.

    The DWORDs are an ``array('I')`` rather than a list so that their bytes are
    the table as the guest reads it (little-endian, as every vfio-user host
    is): the compiled fast lane answers shadow reads straight from this
    buffer. It is never resized, only written in place, so that view stays
    valid for the table's life.
    """

    __slots__ = ("dwords", "vectors")

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.dwords = array("I", list(POWER_ON_ENTRY) * vectors)

    def reset(self) -> None:
        self.dwords[:] = array("I", list(POWER_ON_ENTRY) * self.vectors)

    # -- by DWORD -----------------------------------------------------
    def read_dword(self, index: int) -> int:
        return self.dwords[index]

    def write_dword(self, index: int, value: int) -> None:
        if index & 3 == _CONTROL:
            value &= VECTOR_CONTROL_WRITABLE
        self.dwords[index] = value & 0xFFFFFFFF

    # -- by byte offset (4 or 8 bytes, validated by the caller) -------
    def read(self, offset: int, size: int) -> int:
        index = offset >> 2
        if size == 4:
            return self.dwords[index]
        return self.dwords[index] | (self.dwords[index + 1] << 32)

    def write(self, offset: int, size: int, value: int) -> None:
        index = offset >> 2
        self.write_dword(index, value & 0xFFFFFFFF)
        if size == 8:
            self.write_dword(index + 1, value >> 32)

    # -- by entry -----------------------------------------------------
    def entry(self, vector: int) -> tuple[int, int, int, int]:
        base = vector * DWORDS_PER_ENTRY
        d = self.dwords
        return (d[base], d[base + 1], d[base + 2], d[base + 3])

    def masked(self, vector: int) -> bool:
        return bool(self.dwords[vector * DWORDS_PER_ENTRY + _CONTROL] & VECTOR_CONTROL_MASKBIT)

    def address(self, vector: int) -> int:
        base = vector * DWORDS_PER_ENTRY
        return self.dwords[base] | (self.dwords[base + 1] << 32)

    def data(self, vector: int) -> int:
        return self.dwords[vector * DWORDS_PER_ENTRY + EntryField.DATA]

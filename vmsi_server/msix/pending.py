"""The Pending Bit Array: one bit per vector, read-only to software.

A vector that fires while it cannot be delivered (masked by the table, by the
client's SET_IRQS MASK, by the function mask, MSI-X disabled, no eventfd, or
its message not yet acknowledged by the slow path) gets its bit set; the bit
is cleared when the vector is delivered. Kept as ``image``, the PBA's bytes as
the guest reads them (QWORDs, little-endian), so that the compiled fast lane
can answer PBA reads from the same memory.
"""

from __future__ import annotations


class PendingBits:
    __slots__ = ("image", "vectors")

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.image = bytearray(((vectors + 63) // 64) * 8)
        """Written in place only (never resized): the fast lane holds a view of it."""

    @property
    def bits(self) -> int:
        """All pending bits as one int (bit n: vector n)."""
        return int.from_bytes(self.image, "little")

    def set(self, vector: int) -> None:
        self.image[vector >> 3] |= 1 << (vector & 7)

    def clear(self, vector: int) -> None:
        self.image[vector >> 3] &= ~(1 << (vector & 7)) & 0xFF

    def test(self, vector: int) -> bool:
        return bool(self.image[vector >> 3] >> (vector & 7) & 1)

    def reset(self) -> None:
        self.image[:] = bytes(len(self.image))

    def vectors_set(self) -> list[int]:
        bits, out, v = self.bits, [], 0
        while bits:
            if bits & 1:
                out.append(v)
            bits >>= 1
            v += 1
        return out

    def read(self, offset: int, size: int) -> int:
        """The PBA value at byte ``offset`` (validated, 4 or 8 bytes)."""
        return int.from_bytes(self.image[offset:offset + size], "little")

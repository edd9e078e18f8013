"""The Pending Bit Array: one bit per vector, read-only to software.

A vector that fires while it cannot be delivered (masked by the table, by the
client's SET_IRQS MASK, by the function mask, MSI-X disabled, no eventfd, or
its message not yet acknowledged by the slow path) gets its bit set; the bit
is cleared when the vector is delivered. Kept as one Python int.
"""

from __future__ import annotations


class PendingBits:
    __slots__ = ("bits", "vectors")

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.bits = 0

    def set(self, vector: int) -> None:
        self.bits |= 1 << vector

    def clear(self, vector: int) -> None:
        self.bits &= ~(1 << vector)

    def test(self, vector: int) -> bool:
        return bool(self.bits >> vector & 1)

    def reset(self) -> None:
        self.bits = 0

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
        return (self.bits >> (offset * 8)) & ((1 << (size * 8)) - 1)

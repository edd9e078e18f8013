"""Base Address Registers declared as data, with hardware sizing semantics.

Why masks are enough for sizing: a BAR's low address bits below its size are
read-only 0 and its type bits are read-only constants, so writing all ones and
reading back yields exactly ``~(size - 1) | type`` -- the size mask software
expects -- with no "sizing mode" state. For a 64-bit BAR the next dword holds
the upper half of the address, and therefore the upper half of the mask.
Unused BAR slots and the Expansion ROM BAR (no ROM) are read-only zero, so
sizing them yields 0, which software reads as "not implemented".

Memory BAR dword layout (PCI 3.0 6.2.5.1)::

    31 .......... 4 | 3            | 2:1                   | 0
    base address    | prefetchable | type (00=32, 10=64)   | 0 (memory)

I/O BAR: bits 31:2 address, bit 1 reserved, bit 0 = 1.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from vmsi_server.pci.config_space import BarChanged, ConfigEvent, ConfigSpace, Register, Watch
from vmsi_server.pci.header import HeaderOffset

BAR_COUNT = 6
BAR_STRIDE = 4


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


def bar_offset(index: int) -> int:
    if not 0 <= index < BAR_COUNT:
        raise ValueError(f"BAR index {index} not in 0..5")
    return HeaderOffset.BAR0 + BAR_STRIDE * index


@dataclass(frozen=True, slots=True)
class BarSpec:
    """One implemented BAR; a MEM64 BAR also consumes slot `index + 1`."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < BAR_COUNT:
            raise ValueError(f"BAR index {self.index} not in 0..5")
        if self.size <= 0 or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a power of two")
        if self.kind is BarKind.IO:
            if self.prefetchable:
                raise ValueError(f"BAR{self.index}: an I/O BAR cannot be prefetchable")
            if not 4 <= self.size <= 256:
                raise ValueError(f"BAR{self.index}: I/O BAR size must be 4..256 bytes")
        elif self.size < 16:
            raise ValueError(f"BAR{self.index}: memory BAR size must be at least 16 bytes")
        if self.kind is BarKind.MEM32 and self.size > 1 << 31:
            raise ValueError(f"BAR{self.index}: 32-bit BAR larger than 2 GiB")
        if self.kind is BarKind.MEM64 and (self.index == BAR_COUNT - 1 or self.size > 1 << 63):
            raise ValueError(f"BAR{self.index}: 64-bit BAR needs a following slot and <= 2^63")

    @property
    def slots(self) -> tuple[int, ...]:
        return (self.index, self.index + 1) if self.kind is BarKind.MEM64 else (self.index,)

    @property
    def width(self) -> int:
        """Bytes of config space the BAR occupies (4 or 8)."""
        return 4 * len(self.slots)

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        kind = 0x4 if self.kind is BarKind.MEM64 else 0x0
        return kind | (0x8 if self.prefetchable else 0x0)

    @property
    def flag_mask(self) -> int:
        """Low bits that are flags, not address."""
        return 0x3 if self.kind is BarKind.IO else 0xF

    @property
    def address_mask(self) -> int:
        """Bits the guest may program, across the whole 32- or 64-bit register."""
        full = (1 << (8 * self.width)) - 1
        return full & ~(self.size - 1) & ~self.flag_mask

    def decode(self, raw: int) -> int:
        """The base address in a raw BAR value (both dwords for MEM64)."""
        return raw & ~self.flag_mask & ((1 << (8 * self.width)) - 1)

    def registers(self) -> tuple[Register, ...]:
        mask = self.address_mask
        low = Register(
            f"bar{self.index}",
            bar_offset(self.index),
            4,
            self.type_bits,
            writable=mask & 0xFFFFFFFF,
        )
        if self.kind is not BarKind.MEM64:
            return (low,)
        high = Register(
            f"bar{self.index + 1}_upper", bar_offset(self.index + 1), 4, 0, writable=mask >> 32
        )
        return (low, high)


@dataclass(frozen=True, slots=True)
class BarWatch(Watch):
    """Reports the programmed base so a device can follow where it is mapped."""

    spec: BarSpec

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        old_addr, new_addr = self.spec.decode(old), self.spec.decode(new)
        return BarChanged(self.spec.index, new_addr) if old_addr != new_addr else None


def _checked(specs: Iterable[BarSpec]) -> tuple[BarSpec, ...]:
    out = tuple(sorted(specs, key=lambda s: s.index))
    used: dict[int, int] = {}
    for spec in out:
        for slot in spec.slots:
            if slot in used:
                raise ValueError(f"BAR{spec.index} overlaps BAR{used[slot]} in slot {slot}")
            used[slot] = spec.index
    return out


def bar_registers(specs: Iterable[BarSpec]) -> tuple[Register, ...]:
    """All six BAR slots plus the ROM BAR; unused ones are declared read-only 0."""
    checked = _checked(specs)
    regs: list[Register] = []
    used: set[int] = set()
    for spec in checked:
        regs.extend(spec.registers())
        used.update(spec.slots)
    regs.extend(
        Register(f"bar{i}_unused", bar_offset(i), 4) for i in range(BAR_COUNT) if i not in used
    )
    regs.append(Register("expansion_rom", HeaderOffset.EXPANSION_ROM, 4))
    return tuple(regs)


def bar_watches(specs: Iterable[BarSpec]) -> tuple[Watch, ...]:
    return tuple(BarWatch(bar_offset(s.index), s.width, s) for s in _checked(specs))


def bar_address(space: ConfigSpace, spec: BarSpec) -> int:
    """Where the guest currently placed `spec` (meaningful once memory/I/O decode is on)."""
    return spec.decode(space.read_int(bar_offset(spec.index), spec.width))

"""PCI configuration space: bytes, per-byte write masks, and watched registers.

Why per-byte masks: QEMU forwards guest config accesses of any size at any
alignment (a 2-byte write may straddle MSI-X Message Control and the Table
Offset register). Hardware decodes such an access byte lane by byte lane, so a
model that stores, for every byte, which bits are writable, which are
write-1-to-clear and which are write-only "strobes" gets every access shape
right with no per-register special cases.

Why watches: a few registers have side effects the device or session must act
on (Command, MSI-X Message Control, PMCSR, BARs, Initiate FLR). A `Watch`
covers such a register; after the *whole* write has been applied, each touched
watch compares its value before and after and may emit a typed event. Events
are therefore computed once per access, never from a half-applied write.

Layout knowledge (which register lives where) is declared as `Register` tables
by `header`, `bars` and `capabilities`; this module knows none of it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

CONFIG_SPACE_SIZE = 4096
"""PCIe extended configuration space, the size QEMU's vfio-user-pci reads for region 7."""

STANDARD_CONFIG_SIZE = 256
"""The conventional PCI part; extended capabilities start at this offset."""


class CommandBits(enum.IntFlag):
    """Command register (0x04) bits, for readers of `CommandChanged`."""

    IO_SPACE = 0x0001
    MEMORY_SPACE = 0x0002
    BUS_MASTER = 0x0004
    PARITY_ERROR_RESPONSE = 0x0040
    SERR_ENABLE = 0x0100
    INTX_DISABLE = 0x0400


class PowerState(enum.IntEnum):
    """PMCSR PowerState field (bits 1:0)."""

    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


@dataclass(frozen=True, slots=True)
class CommandChanged:
    """The guest changed the Command register; decode enables may have flipped."""

    old: int
    new: int

    @property
    def memory_enabled(self) -> bool:
        return bool(self.new & CommandBits.MEMORY_SPACE)

    @property
    def bus_master(self) -> bool:
        return bool(self.new & CommandBits.BUS_MASTER)


@dataclass(frozen=True, slots=True)
class MsixControlChanged:
    """MSI-X Enable or Function Mask changed (never emitted for other bits)."""

    enabled: bool
    function_masked: bool


@dataclass(frozen=True, slots=True)
class FunctionLevelReset:
    """Initiate FLR was written as 1 while FLR is advertised.

    The config space does not reset itself: the owner resets device state and
    then calls `ConfigSpace.reset()`, so both happen in the order it chooses.
    """


@dataclass(frozen=True, slots=True)
class PowerStateChanged:
    """PMCSR PowerState moved to a supported state (unsupported writes are dropped)."""

    state: PowerState


@dataclass(frozen=True, slots=True)
class BarChanged:
    """The decoded base address of BAR `index` changed.

    Sizing writes (all ones) produce this too, with the size mask as the
    address; act on BAR addresses only while the matching decode enable is set.
    """

    index: int
    address: int


ConfigEvent = (
    CommandChanged | MsixControlChanged | FunctionLevelReset | PowerStateChanged | BarChanged
)


@dataclass(frozen=True, slots=True)
class Register:
    """One config register as a datasheet table lists it, with its masks.

    `writable` bits take the written value; `w1c` bits are cleared by writing 1;
    `strobe` bits accept a write, read back 0, and are reported to the covering
    `Watch` (Initiate FLR). All other bits are read-only and keep `reset`.
    `offset` is absolute in config space, or relative to a capability until
    `moved()`.
    """

    name: str
    offset: int
    size: int
    reset: int = 0
    writable: int = 0
    w1c: int = 0
    strobe: int = 0

    def __post_init__(self) -> None:
        if self.size not in (1, 2, 3, 4):
            raise ValueError(f"{self.name}: register size {self.size} not in 1..4")
        if self.offset < 0:
            raise ValueError(f"{self.name}: negative offset {self.offset}")
        limit = 1 << (8 * self.size)
        for label, value in (
            ("reset", self.reset),
            ("writable", self.writable),
            ("w1c", self.w1c),
            ("strobe", self.strobe),
        ):
            if not 0 <= value < limit:
                raise ValueError(f"{self.name}: {label} {value:#x} does not fit {self.size} bytes")
        if self.writable & self.w1c or self.strobe & (self.writable | self.w1c):
            raise ValueError(f"{self.name}: writable, w1c and strobe masks must be disjoint")
        if self.reset & self.strobe:
            raise ValueError(f"{self.name}: strobe bits must reset to 0")

    def moved(self, base: int) -> Register:
        """The same register placed `base` bytes further (capability-relative to absolute)."""
        return replace(self, offset=self.offset + base)


@dataclass(frozen=True, slots=True)
class Watch:
    """A register whose changes matter to the device; subclasses say how.

    `constrain` may veto part of a write the byte masks allowed (PMCSR drops
    unsupported power states); `event` turns the before/after values, plus the
    strobe bits written as 1, into an event or None.
    """

    offset: int
    size: int

    def constrain(self, old: int, new: int) -> int:
        return new

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        return None


class ConfigSpace:
    """A function's configuration space as the guest sees it through region 7."""

    __slots__ = (
        "_data",
        "_power_on",
        "_registers",
        "_strobe",
        "_w1c",
        "_watch_at",
        "_watches",
        "_wmask",
    )

    def __init__(
        self,
        registers: Iterable[Register],
        watches: Iterable[Watch] = (),
        size: int = CONFIG_SPACE_SIZE,
    ) -> None:
        regs = tuple(sorted(registers, key=lambda r: r.offset))
        data = bytearray(size)
        wmask = bytearray(size)
        w1c = bytearray(size)
        strobe = bytearray(size)
        owner: list[str | None] = [None] * size
        for reg in regs:
            if reg.offset + reg.size > size:
                raise ValueError(f"{reg.name} at {reg.offset:#x} runs past {size:#x}")
            for i in range(reg.size):
                pos = reg.offset + i
                if owner[pos] is not None:
                    raise ValueError(f"{reg.name} overlaps {owner[pos]} at {pos:#x}")
                owner[pos] = reg.name
                shift = 8 * i
                data[pos] = (reg.reset >> shift) & 0xFF
                wmask[pos] = (reg.writable >> shift) & 0xFF
                w1c[pos] = (reg.w1c >> shift) & 0xFF
                strobe[pos] = (reg.strobe >> shift) & 0xFF
        wlist = tuple(sorted(watches, key=lambda w: w.offset))
        watch_at = [-1] * size
        for index, watch in enumerate(wlist):
            if watch.offset < 0 or watch.offset + watch.size > size or watch.size <= 0:
                raise ValueError(f"{watch!r} is outside config space")
            for pos in range(watch.offset, watch.offset + watch.size):
                if watch_at[pos] >= 0:
                    raise ValueError(f"{watch!r} overlaps {wlist[watch_at[pos]]!r}")
                watch_at[pos] = index
        self._data = data
        self._wmask = bytes(wmask)
        self._w1c = bytes(w1c)
        self._strobe = bytes(strobe)
        self._registers = regs
        self._watches = wlist
        self._watch_at = watch_at
        self._power_on = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def buffer(self) -> bytearray:
        """The bytes the guest reads, written only in place (the fast lane reads them)."""
        return self._data

    @property
    def registers(self) -> tuple[Register, ...]:
        return self._registers

    def _check(self, offset: int, count: int) -> int:
        end = offset + count
        if offset < 0 or count < 0 or end > len(self._data):
            raise ValueError(f"config access {offset:#x}+{count} outside 0..{len(self._data):#x}")
        return end

    def read(self, offset: int, count: int) -> bytes:
        """Any size, any alignment: config reads have no side effects here."""
        end = self._check(offset, count)
        return bytes(self._data[offset:end])

    def read_int(self, offset: int, size: int) -> int:
        """Little-endian convenience for device code that wants register values."""
        end = self._check(offset, size)
        return int.from_bytes(self._data[offset:end], "little")

    def write(self, offset: int, data: bytes) -> list[ConfigEvent]:
        """Apply a guest write byte lane by byte lane, then report side effects."""
        end = self._check(offset, len(data))
        if offset == end:
            return []
        buf = self._data
        watch_at = self._watch_at
        touched = sorted({watch_at[pos] for pos in range(offset, end) if watch_at[pos] >= 0})
        before = [
            int.from_bytes(buf[w.offset : w.offset + w.size], "little")
            for w in (self._watches[i] for i in touched)
        ]
        strobed = bytearray(len(data))
        wmask, w1c, strobe = self._wmask, self._w1c, self._strobe
        for i, value in enumerate(data):
            pos = offset + i
            keep = buf[pos] & ~wmask[pos]
            buf[pos] = (keep | (value & wmask[pos])) & ~(value & w1c[pos])
            strobed[i] = value & strobe[pos]
        events: list[ConfigEvent] = []
        for index, old in zip(touched, before, strict=True):
            watch = self._watches[index]
            lo, hi = watch.offset, watch.offset + watch.size
            new = int.from_bytes(buf[lo:hi], "little")
            kept = watch.constrain(old, new)
            if kept != new:
                buf[lo:hi] = kept.to_bytes(watch.size, "little")
            hit = 0
            for pos in range(max(lo, offset), min(hi, end)):
                hit |= strobed[pos - offset] << (8 * (pos - lo))
            event = watch.event(old, kept, hit)
            if event is not None:
                events.append(event)
        return events

    def device_write(self, offset: int, data: bytes) -> None:
        """Device-side update (e.g. latching an error status bit): no masks, no events."""
        end = self._check(offset, len(data))
        self._data[offset:end] = data

    def reset(self) -> None:
        """Back to power-on values (FLR, DEVICE_RESET); emits no events.

        A VF FLR keeps only sticky bits, and this model has none, so everything
        returns to power-on; the caller resets its own MSI-X/decode state.
        """
        self._data[:] = self._power_on

    def describe(self) -> str:
        """One line per declared register: where, what, current value and masks."""
        lines = []
        for reg in self._registers:
            value = self.read_int(reg.offset, reg.size)
            width = 2 * reg.size
            lines.append(
                f"{reg.offset:#05x} {reg.size} {reg.name:<28} = {value:#0{width + 2}x}"
                f"  rw={reg.writable:#0{width + 2}x} w1c={reg.w1c:#0{width + 2}x}"
                + (f" strobe={reg.strobe:#0{width + 2}x}" if reg.strobe else "")
            )
        return "\n".join(lines)

"""The 82576 Virtual Function's BAR0 register map, declared as data, and its dispatch engine.

Why a table: the datasheet (and igbvf.md §2) describes the register file as a
table of offset, name, access kind and reset value. Keeping it in that shape
means a reviewer checks the model against the document line by line, and the
behaviour of every plain register follows from its row instead of from a
hand-written branch. Registers whose behaviour reaches other objects (the
mailbox, the interrupt unit, the rings, the stats) get bound handlers on top of
the same table, the way QEMU's ``igb_core.c`` fills ``igb_macreg_readops[]`` /
``igb_macreg_writeops[]`` by register index.

Access sizes: igbvf only issues aligned 32-bit loads and stores, and the
hardware decodes BAR0 by dword. The owner (``VfCore``) therefore accepts only
4-byte accesses at 4-byte aligned offsets and refuses every other shape with
``AccessError(EINVAL)`` rather than inventing split semantics that would run
read-to-clear side effects on partial reads.

Undefined offsets read 0 and ignore writes (as QEMU's model does); each one is
counted and logged once, at debug level, the first time it is touched.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Final

import structlog

log = structlog.get_logger("vmsi.nic")

ReadFn = Callable[[], int]
WriteFn = Callable[[int], None]

U32: Final = 0xFFFF_FFFF
BAR0_SIZE: Final = 0x4000
"""16 KiB; the driver uses nothing at or above 0x4000."""

# -- offsets (igbvf regs.h, queue 0 through the 0x2800 / 0x3800 alias blocks) ------------
CTRL: Final = 0x0000
STATUS: Final = 0x0008
ITR: Final = 0x00C4
VMBMEM: Final = 0x0800
VMBMEM_WORDS: Final = 16
V2PMAILBOX: Final = 0x0C40

VFGPRC: Final = 0x0F10
VFGPTC: Final = 0x0F14
VFGORC: Final = 0x0F18
VFGOTC: Final = 0x0F34
VFMPRC: Final = 0x0F3C
VFGPRLBC: Final = 0x0F40
VFGPTLBC: Final = 0x0F44
VFGORLBC: Final = 0x0F48
VFGOTLBC: Final = 0x0F50

EICS: Final = 0x1520
EIMS: Final = 0x1524
EIMC: Final = 0x1528
EIAC: Final = 0x152C
EIAM: Final = 0x1530
EICR: Final = 0x1580
EITR0: Final = 0x1680
EITR1: Final = 0x1684
EITR2: Final = 0x1688
EITR_COUNT: Final = 3
IVAR0: Final = 0x1700
IVAR_MISC: Final = 0x1740

RDBAL0: Final = 0x2800
RDBAH0: Final = 0x2804
RDLEN0: Final = 0x2808
SRRCTL0: Final = 0x280C
RDH0: Final = 0x2810
DCA_RXCTRL0: Final = 0x2814
RDT0: Final = 0x2818
RXDCTL0: Final = 0x2828

TDBAL0: Final = 0x3800
TDBAH0: Final = 0x3804
TDLEN0: Final = 0x3808
TDH0: Final = 0x3810
DCA_TXCTRL0: Final = 0x3814
TDT0: Final = 0x3818
TXDCTL0: Final = 0x3828

# -- bits --------------------------------------------------------------------------------
CTRL_RST: Final = 0x0400_0000
"""Self-clearing VF software reset (igbvf.md §3.1)."""

STATUS_FD: Final = 0x01
STATUS_LU: Final = 0x02
STATUS_SPEED_100: Final = 0x40
STATUS_SPEED_1000: Final = 0x80
STATUS_LINK_UP: Final = STATUS_LU | STATUS_FD | STATUS_SPEED_1000
"""0x83: what igbvf needs to see for "Link is Up 1000 Mbps Full Duplex"."""

V2P_REQ: Final = 0x01
V2P_ACK: Final = 0x02
V2P_VFU: Final = 0x04
V2P_PFU: Final = 0x08
V2P_PFSTS: Final = 0x10
V2P_PFACK: Final = 0x20
V2P_RSTI: Final = 0x40
V2P_RSTD: Final = 0x80
V2P_READ_CLEAR: Final = V2P_PFSTS | V2P_PFACK | V2P_RSTD
"""0xB0: the driver ORs every read into a cache, so these must clear on read (§4.2)."""

NUM_VECTORS: Final = 3
VECTOR_MASK: Final = (1 << NUM_VECTORS) - 1
"""EICR/EICS/EIMS/EIMC/EIAC/EIAM bit n = MSI-X vector n (0 TX, 1 RX, 2 other)."""

EITR_INTERVAL_MASK: Final = 0x7FFC
"""EITR interval field (bits 14:2); the interval is about value x 256 ns (§6.3)."""

IVAR_VALID: Final = 0x80
IVAR_VECTOR: Final = 0x03
IVAR0_MASK: Final = 0x8383_8383
IVAR_MISC_MASK: Final = 0x83

XDCTL_ENABLE: Final = 0x0200_0000
XDCTL_SWFLSH: Final = 0x0400_0000
"""Software flush: self-clearing in hardware, nothing to flush here."""

RING_LEN_MASK: Final = 0x000F_FF80
"""TDLEN/RDLEN bits 19:7: ring sizes are 128-byte multiples."""

RING_INDEX_MASK: Final = 0xFFFF
"""TDH/TDT/RDH/RDT hold a 16-bit descriptor index."""


class Access(enum.Enum):
    """How a register answers reads and writes when nothing more specific is bound.

    ``RW`` stores ``value & write_mask`` minus self-clearing bits; ``RO`` ignores
    writes; ``WO`` reads 0; ``RC`` is read-only and clears ``read_clear`` bits
    (all bits unless given) when read; ``W1S``/``W1C`` set/clear the written 1s
    in ``target`` (itself when no target; a register with a target has no
    storage and reads 0, like EICS and EIMC). ``read_clear`` also applies to
    ``RW`` registers (V2PMAILBOX clears PFSTS|PFACK|RSTD on read).
    """

    RW = "RW"
    RO = "RO"
    WO = "WO"
    RC = "RC"
    W1S = "W1S"
    W1C = "W1C"


@dataclass(frozen=True, slots=True)
class Register:
    """One row of the register table (igbvf.md §2)."""

    offset: int
    name: str
    access: Access
    reset: int = 0
    write_mask: int = U32
    self_clear: int = 0
    read_clear: int = 0
    target: int | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.offset & 3 or not 0 <= self.offset < BAR0_SIZE:
            raise ValueError(f"{self.name}: offset {self.offset:#x} not a BAR0 dword")
        if self.access is Access.RC and not self.read_clear:
            object.__setattr__(self, "read_clear", U32)

    @property
    def index(self) -> int:
        return self.offset >> 2

    def stored(self, value: int) -> int:
        """What a plain write leaves in storage: masked, self-clearing bits already gone."""
        return value & self.write_mask & ~self.self_clear & U32


def _rw(offset: int, name: str, doc: str = "", **kw: int) -> Register:
    return Register(offset, name, Access.RW, doc=doc, **kw)


def _ro(offset: int, name: str, doc: str = "", **kw: int) -> Register:
    return Register(offset, name, Access.RO, doc=doc, **kw)


STATS_DOCS: Final = {
    VFGPRC: ("VFGPRC", "good packets received"),
    VFGPTC: ("VFGPTC", "good packets transmitted"),
    VFGORC: ("VFGORC", "good octets received"),
    VFGOTC: ("VFGOTC", "good octets transmitted"),
    VFMPRC: ("VFMPRC", "multicast packets received"),
    VFGPRLBC: ("VFGPRLBC", "loopback packets received"),
    VFGPTLBC: ("VFGPTLBC", "loopback packets transmitted"),
    VFGORLBC: ("VFGORLBC", "loopback octets received"),
    VFGOTLBC: ("VFGOTLBC", "loopback octets transmitted"),
}

REGISTERS: Final[tuple[Register, ...]] = (
    _rw(CTRL, "CTRL", "RST (bit 26) resets the VF and reads back 0", self_clear=CTRL_RST),
    _ro(STATUS, "STATUS", "0x83 with link up; LU clear when down", reset=STATUS_LINK_UP),
    _rw(ITR, "ITR", "defined, unused by igbvf: storage only"),
    *(_rw(VMBMEM + 4 * i, f"VMBMEM{i}", "mailbox buffer") for i in range(VMBMEM_WORDS)),
    _rw(
        V2PMAILBOX,
        "V2PMAILBOX",
        "REQ/ACK are strobes, VFU the VF lock; PFSTS|PFACK|RSTD clear on read",
        reset=V2P_RSTD,
        write_mask=V2P_REQ | V2P_ACK | V2P_VFU,
        self_clear=V2P_REQ | V2P_ACK,
        read_clear=V2P_READ_CLEAR,
    ),
    *(
        _ro(off, name, f"{text}: not cleared on read, wraps at 32 bits")
        for off, (name, text) in STATS_DOCS.items()
    ),
    Register(
        EICS,
        "EICS",
        Access.W1S,
        write_mask=VECTOR_MASK,
        target=EICR,
        doc="software interrupt: sets EICR bits",
    ),
    Register(
        EIMS,
        "EIMS",
        Access.W1S,
        write_mask=VECTOR_MASK,
        doc="enable (re-arm) vectors; reads the enable mask",
    ),
    Register(EIMC, "EIMC", Access.W1C, write_mask=VECTOR_MASK, target=EIMS, doc="disable vectors"),
    _rw(EIAC, "EIAC", "EICR bits auto-cleared when their message is sent", write_mask=VECTOR_MASK),
    _rw(
        EIAM,
        "EIAM",
        "EIMS bits auto-cleared (auto-mask) when their message is sent",
        write_mask=VECTOR_MASK,
    ),
    Register(
        EICR,
        "EICR",
        Access.RC,
        write_mask=VECTOR_MASK,
        doc="pending causes, bit n = vector n; read-to-clear",
    ),
    *(
        _rw(
            EITR0 + 4 * i,
            f"EITR{i}",
            "moderation interval, value x 256 ns",
            write_mask=EITR_INTERVAL_MASK,
        )
        for i in range(EITR_COUNT)
    ),
    _rw(IVAR0, "IVAR0", "RX0 byte 0, TX0 byte 1 (valid 0x80 | vector)", write_mask=IVAR0_MASK),
    _rw(
        IVAR_MISC,
        "IVAR_MISC",
        "mailbox/other vector (valid 0x80 | vector)",
        write_mask=IVAR_MISC_MASK,
    ),
    _rw(RDBAL0, "RDBAL0", "RX ring base, low"),
    _rw(RDBAH0, "RDBAH0", "RX ring base, high"),
    _rw(RDLEN0, "RDLEN0", "RX ring bytes, 128-byte multiple", write_mask=RING_LEN_MASK),
    _rw(SRRCTL0, "SRRCTL0", "buffer sizes and descriptor type"),
    _rw(RDH0, "RDH0", "RX head, advanced by the device", write_mask=RING_INDEX_MASK),
    _rw(DCA_RXCTRL0, "DCA_RXCTRL0", "unused: storage only"),
    _rw(RDT0, "RDT0", "RX tail: refill doorbell", write_mask=RING_INDEX_MASK),
    _rw(RXDCTL0, "RXDCTL0", "ENABLE bit 25, thresholds", self_clear=XDCTL_SWFLSH),
    _rw(TDBAL0, "TDBAL0", "TX ring base, low"),
    _rw(TDBAH0, "TDBAH0", "TX ring base, high"),
    _rw(TDLEN0, "TDLEN0", "TX ring bytes, 128-byte multiple", write_mask=RING_LEN_MASK),
    _rw(TDH0, "TDH0", "TX head, advanced by the device", write_mask=RING_INDEX_MASK),
    _rw(DCA_TXCTRL0, "DCA_TXCTRL0", "storage (driver clears TX_WB_RO_EN)"),
    _rw(TDT0, "TDT0", "TX tail: per-packet doorbell", write_mask=RING_INDEX_MASK),
    _rw(TXDCTL0, "TXDCTL0", "ENABLE bit 25", self_clear=XDCTL_SWFLSH),
)

BY_OFFSET: Final[dict[int, Register]] = {reg.offset: reg for reg in REGISTERS}
BY_NAME: Final[dict[str, Register]] = {reg.name: reg for reg in REGISTERS}


class RegisterFile:
    """Dispatch tables indexed by ``offset >> 2``, plus storage for plain registers.

    Every defined register starts with the generic handler of its access kind
    over ``values``; an owner replaces the handlers of registers whose state
    lives elsewhere with ``bind``. The tables are plain lists so a hot-path
    access costs one index and one call.
    """

    def __init__(self, registers: Iterable[Register], size: int = BAR0_SIZE) -> None:
        slots = size // 4
        self.size = size
        self.values: list[int] = [0] * slots
        self.registers: dict[int, Register] = {}
        self.readers: list[ReadFn] = [partial(self._read_undefined, i) for i in range(slots)]
        self.writers: list[WriteFn] = [partial(self._write_undefined, i) for i in range(slots)]
        self.undefined_reads = 0
        self.undefined_writes = 0
        self.ignored_writes = 0
        """Writes to read-only registers (dropped, as the hardware does)."""
        self._reported: set[int] = set()
        for reg in registers:
            self.define(reg)
        self.reset()

    # -- table building -------------------------------------------------------------------
    def define(self, reg: Register) -> None:
        if reg.offset >= self.size or reg.offset in self.registers:
            raise ValueError(f"{reg.name}: offset {reg.offset:#x} outside or defined twice")
        self.registers[reg.offset] = reg
        self.readers[reg.index] = self._generic_reader(reg)
        self.writers[reg.index] = self._generic_writer(reg)

    def bind(
        self, offset: int, *, read: ReadFn | None = None, write: WriteFn | None = None
    ) -> None:
        """Replace a defined register's handlers with the owner's."""
        reg = self.registers.get(offset)
        if reg is None:
            raise KeyError(f"no register defined at {offset:#x}")
        if read is not None:
            self.readers[reg.index] = read
        if write is not None:
            self.writers[reg.index] = write

    def is_defined(self, offset: int) -> bool:
        return offset in self.registers

    def reset(self) -> None:
        """Storage back to the declared reset values (bound registers reset themselves)."""
        values = self.values
        for i in range(len(values)):
            values[i] = 0
        for reg in self.registers.values():
            values[reg.index] = reg.reset

    # -- generic kinds --------------------------------------------------------------------
    def _generic_reader(self, reg: Register) -> ReadFn:
        values, i = self.values, reg.index
        if reg.target is not None or reg.access is Access.WO:
            return _zero
        clear = reg.read_clear
        if clear:

            def read_clearing() -> int:
                value = values[i]
                values[i] = value & ~clear
                return value

            return read_clearing
        return partial(values.__getitem__, i)

    def _generic_writer(self, reg: Register) -> WriteFn:
        values, i, mask = self.values, reg.index, reg.write_mask
        target = reg.index if reg.target is None else reg.target >> 2
        kind = reg.access
        if kind in (Access.RO, Access.RC):
            return self._write_ignored
        if kind is Access.W1S:

            def write_set(value: int) -> None:
                values[target] |= value & mask

            return write_set
        if kind is Access.W1C:

            def write_clear(value: int) -> None:
                values[target] &= ~(value & mask)

            return write_clear

        stored = reg.stored

        def write_store(value: int) -> None:
            values[i] = stored(value)

        return write_store

    def _write_ignored(self, value: int) -> None:
        self.ignored_writes += 1

    # -- undefined offsets ----------------------------------------------------------------
    def _read_undefined(self, index: int) -> int:
        self.undefined_reads += 1
        self._report(index, "read")
        return 0

    def _write_undefined(self, index: int, value: int) -> None:
        self.undefined_writes += 1
        self._report(index, "write")

    def _report(self, index: int, op: str) -> None:
        if index not in self._reported:
            self._reported.add(index)
            log.debug("nic.reg.unknown", offset=f"{index << 2:#06x}", op=op)


def _zero() -> int:
    return 0

"""Type 0 configuration header (0x00-0x3F), declared as a register table.

BARs (0x10-0x27) and the Expansion ROM BAR (0x30) come from `bars`; the
Capabilities Pointer value and Status bit 4 come from the capability chain.
Why these write masks:

* Command: Memory Space, Bus Master, Parity Error Response, SERR# and
  Interrupt Disable are writable. I/O Space is writable only when the function
  has an I/O BAR: PCIe lets a function without I/O space hardwire it to 0, and a
  guest that sets it must not believe I/O decode is on. Special Cycles, MWI,
  VGA snoop and Fast Back-to-Back are hardwired 0 on PCIe.
* Status: Capabilities List is read-only; the error bits (8, 11-15) are RW1C
  so the device can latch them with `ConfigSpace.device_write` and the guest
  can acknowledge them. Interrupt Status stays 0: an MSI-X-only VF has no INTx.
* Cache Line Size and Interrupt Line are plain storage for software. Latency
  Timer, BIST, Min_Gnt and Max_Lat are hardwired 0 on PCIe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmsi_server.pci.config_space import CommandBits, CommandChanged, ConfigEvent, Register, Watch


class HeaderOffset(enum.IntEnum):
    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_CODE = 0x09
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BAR0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    EXPANSION_ROM = 0x30
    CAPABILITIES_POINTER = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class StatusBits(enum.IntFlag):
    INTERRUPT_STATUS = 0x0008
    CAPABILITIES_LIST = 0x0010
    MASTER_DATA_PARITY_ERROR = 0x0100
    SIGNALED_TARGET_ABORT = 0x0800
    RECEIVED_TARGET_ABORT = 0x1000
    RECEIVED_MASTER_ABORT = 0x2000
    SIGNALED_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY_ERROR = 0x8000


STATUS_W1C = (
    StatusBits.MASTER_DATA_PARITY_ERROR
    | StatusBits.SIGNALED_TARGET_ABORT
    | StatusBits.RECEIVED_TARGET_ABORT
    | StatusBits.RECEIVED_MASTER_ABORT
    | StatusBits.SIGNALED_SYSTEM_ERROR
    | StatusBits.DETECTED_PARITY_ERROR
)

COMMAND_WRITABLE = (
    CommandBits.MEMORY_SPACE
    | CommandBits.BUS_MASTER
    | CommandBits.PARITY_ERROR_RESPONSE
    | CommandBits.SERR_ENABLE
    | CommandBits.INTX_DISABLE
)


@dataclass(frozen=True, slots=True)
class PciIdentity:
    """Who the function says it is; drivers bind on vendor/device/class."""

    vendor_id: int
    device_id: int
    revision: int
    class_code: int
    """24 bits: base class << 16 | subclass << 8 | programming interface."""
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 0
    """0 = no INTx (every VF), 1-4 = INTA#-INTD#."""

    def __post_init__(self) -> None:
        for name, value, bits in (
            ("vendor_id", self.vendor_id, 16),
            ("device_id", self.device_id, 16),
            ("revision", self.revision, 8),
            ("class_code", self.class_code, 24),
            ("subsystem_vendor_id", self.subsystem_vendor_id, 16),
            ("subsystem_id", self.subsystem_id, 16),
        ):
            if not 0 <= value < (1 << bits):
                raise ValueError(f"{name} {value:#x} does not fit {bits} bits")
        if not 0 <= self.interrupt_pin <= 4:
            raise ValueError(f"interrupt_pin {self.interrupt_pin} not in 0..4")


@dataclass(frozen=True, slots=True)
class CommandWatch(Watch):
    """Memory decode and bus mastering gate BAR access and DMA in the device."""

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        return CommandChanged(old, new) if old != new else None


def header_registers(
    identity: PciIdentity, *, capabilities_pointer: int, io_decode: bool
) -> tuple[Register, ...]:
    """The header minus BARs/ROM; `io_decode` says whether any BAR is an I/O BAR."""
    command_rw = COMMAND_WRITABLE | (CommandBits.IO_SPACE if io_decode else 0)
    status = StatusBits.CAPABILITIES_LIST if capabilities_pointer else 0
    o = HeaderOffset
    return (
        Register("vendor_id", o.VENDOR_ID, 2, identity.vendor_id),
        Register("device_id", o.DEVICE_ID, 2, identity.device_id),
        Register("command", o.COMMAND, 2, 0, writable=int(command_rw)),
        Register("status", o.STATUS, 2, int(status), w1c=int(STATUS_W1C)),
        Register("revision_id", o.REVISION_ID, 1, identity.revision),
        Register("class_code", o.CLASS_CODE, 3, identity.class_code),
        Register("cache_line_size", o.CACHE_LINE_SIZE, 1, 0, writable=0xFF),
        Register("latency_timer", o.LATENCY_TIMER, 1),
        Register("header_type", o.HEADER_TYPE, 1),
        Register("bist", o.BIST, 1),
        Register("cardbus_cis", o.CARDBUS_CIS, 4),
        Register("subsystem_vendor_id", o.SUBSYSTEM_VENDOR_ID, 2, identity.subsystem_vendor_id),
        Register("subsystem_id", o.SUBSYSTEM_ID, 2, identity.subsystem_id),
        Register("capabilities_pointer", o.CAPABILITIES_POINTER, 1, capabilities_pointer),
        Register("interrupt_line", o.INTERRUPT_LINE, 1, 0, writable=0xFF),
        Register("interrupt_pin", o.INTERRUPT_PIN, 1, identity.interrupt_pin),
        Register("min_gnt", o.MIN_GNT, 1),
        Register("max_lat", o.MAX_LAT, 1),
    )


def header_watches() -> tuple[Watch, ...]:
    return (CommandWatch(HeaderOffset.COMMAND, 2),)

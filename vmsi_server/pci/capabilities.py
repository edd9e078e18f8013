"""PCI capabilities (MSI-X, PCI Express, Power Management) declared as register tables.

Each capability class lists its body registers relative to its own start
(from offset 2 on); `build_capability_chain` places them, prepends the
read-only ID and next-pointer bytes, and links them in the order given.
Keeping ID/next out of the bodies is why they can never become writable: the
chain builder alone declares them, always read-only.

Choices made here, and why:

* MSI-X Message Control: only Enable (bit 15) and Function Mask (bit 14) are
  writable; Table Size and both offset/BIR registers are read-only. Because
  masks are per byte, any access shape into the capability (1/2/4 bytes, at
  any offset, spanning registers) changes only those two bits, and the event
  is computed after the whole access.
* PCI Express v2 endpoint: Device Capabilities advertises Max Payload, Role-
  Based Error Reporting (required since PCIe 1.1) and optionally FLR. Device
  Control makes the error-reporting enables, Relaxed Ordering, Max Payload,
  Extended Tag, No Snoop and Max Read Request writable; Phantom Functions and
  Aux Power PM stay 0 (not supported). Initiate FLR is a strobe: it reads 0 and
  emits `FunctionLevelReset` only when FLR is advertised (otherwise it is an
  ordinary read-only 0). Device Status error bits 3:0 are RW1C. The link
  reports x1 at 2.5 GT/s in Link Capabilities and Link Status; Data Link Layer
  Link Active (Link Status bit 13) is left 0 because PCIe defines it only for
  downstream ports that set its reporting capability. Link Control keeps only
  Common Clock and Extended Synch writable (no ASPM to control). The "2"
  registers are zero: nothing optional is claimed.
* Power Management 1.2: D0 and D3hot only, no PME. PowerState is writable but
  a write naming an unsupported state is discarded, as the PM spec requires.
  No_Soft_Reset is set: D3hot -> D0 keeps the function's state, so the guest
  must not expect (and we need not perform) a reset on that transition.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from vmsi_server.pci.config_space import (
    STANDARD_CONFIG_SIZE,
    ConfigEvent,
    ConfigSpace,
    FunctionLevelReset,
    MsixControlChanged,
    PowerState,
    PowerStateChanged,
    Register,
    Watch,
)
from vmsi_server.pci.header import HeaderOffset, StatusBits

CAPABILITY_AREA_START = 0x40
"""First byte after the type 0 header; capabilities live in 0x40..0xFF."""


class CapabilityId(enum.IntEnum):
    POWER_MANAGEMENT = 0x01
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class Capability(ABC):
    """A standard capability body; ID and next pointer are added by the chain."""

    __slots__ = ()

    CAP_ID: ClassVar[CapabilityId]
    SIZE: ClassVar[int]
    NAME: ClassVar[str]

    @abstractmethod
    def body(self) -> tuple[Register, ...]:
        """Registers from offset 2 on, offsets relative to the capability start."""

    def watches(self, base: int) -> tuple[Watch, ...]:
        return ()


# --- MSI-X -------------------------------------------------------------------


class MsixOffset(enum.IntEnum):
    MESSAGE_CONTROL = 0x02
    TABLE = 0x04
    PBA = 0x08


MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
MSIX_TABLE_SIZE_MASK = 0x07FF
MSIX_BIR_MASK = 0x7


@dataclass(frozen=True, slots=True)
class MsixControlWatch(Watch):
    """Enable/Function Mask decide whether and how vectors may fire."""

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        bits = MSIX_ENABLE | MSIX_FUNCTION_MASK
        if (old ^ new) & bits == 0:
            return None
        return MsixControlChanged(
            enabled=bool(new & MSIX_ENABLE), function_masked=bool(new & MSIX_FUNCTION_MASK)
        )


@dataclass(frozen=True, slots=True)
class MsixCapability(Capability):
    """MSI-X, 12 bytes.

    ``+0`` ID 0x11, ``+1`` next, ``+2`` Message Control (table size - 1, function
    mask, enable), ``+4`` Table Offset[31:3] | BIR[2:0], ``+8`` PBA Offset[31:3] |
    BIR[2:0].
    """

    CAP_ID: ClassVar[CapabilityId] = CapabilityId.MSIX
    SIZE: ClassVar[int] = 12
    NAME: ClassVar[str] = "msix"

    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    def __post_init__(self) -> None:
        if not 1 <= self.table_size <= MSIX_TABLE_SIZE_MASK + 1:
            raise ValueError(f"MSI-X table size {self.table_size} not in 1..2048")
        for name, bir, offset in (
            ("table", self.table_bar, self.table_offset),
            ("PBA", self.pba_bar, self.pba_offset),
        ):
            if not 0 <= bir <= 5:
                raise ValueError(f"MSI-X {name} BIR {bir} not in 0..5")
            if offset < 0 or offset & MSIX_BIR_MASK or offset >= 1 << 32:
                raise ValueError(f"MSI-X {name} offset {offset:#x} not 8-byte aligned u32")

    @property
    def table_bytes(self) -> int:
        return 16 * self.table_size

    @property
    def pba_bytes(self) -> int:
        return 8 * ((self.table_size + 63) // 64)

    def body(self) -> tuple[Register, ...]:
        o = MsixOffset
        return (
            Register(
                "message_control",
                o.MESSAGE_CONTROL,
                2,
                self.table_size - 1,
                writable=MSIX_ENABLE | MSIX_FUNCTION_MASK,
            ),
            Register("table_offset_bir", o.TABLE, 4, self.table_offset | self.table_bar),
            Register("pba_offset_bir", o.PBA, 4, self.pba_offset | self.pba_bar),
        )

    def watches(self, base: int) -> tuple[Watch, ...]:
        return (MsixControlWatch(base + MsixOffset.MESSAGE_CONTROL, 2),)


# --- PCI Express ---------------------------------------------------------------


class PcieOffset(enum.IntEnum):
    CAPABILITIES = 0x02
    DEVICE_CAPABILITIES = 0x04
    DEVICE_CONTROL = 0x08
    DEVICE_STATUS = 0x0A
    LINK_CAPABILITIES = 0x0C
    LINK_CONTROL = 0x10
    LINK_STATUS = 0x12
    DEVICE_CAPABILITIES_2 = 0x24
    DEVICE_CONTROL_2 = 0x28
    DEVICE_STATUS_2 = 0x2A
    LINK_CAPABILITIES_2 = 0x2C
    LINK_CONTROL_2 = 0x30
    LINK_STATUS_2 = 0x32


PCIE_CAP_VERSION = 2
PCIE_TYPE_ENDPOINT = 0x0
DEVCAP_ROLE_BASED_ERROR = 1 << 15
DEVCAP_FLR = 1 << 28
DEVCTL_WRITABLE = 0x79FF
"""Error enables 3:0, Relaxed Ordering 4, MPS 7:5, Extended Tag 8, No Snoop 11, MRRS 14:12."""
DEVCTL_RESET = 0x2810
"""Power-on: Relaxed Ordering and No Snoop enabled, MRRS 512, MPS 128 (PCIe defaults)."""
DEVCTL_INITIATE_FLR = 0x8000
DEVSTA_W1C = 0x000F
"""Correctable, Non-Fatal, Fatal, Unsupported Request Detected."""
LNKCTL_WRITABLE = 0x00C0
LNKSTA_SLOT_CLOCK = 1 << 12


@dataclass(frozen=True, slots=True)
class FlrWatch(Watch):
    """Initiate FLR is write-only: the strobe, not the stored value, is the request."""

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        return FunctionLevelReset() if strobed & DEVCTL_INITIATE_FLR else None


@dataclass(frozen=True, slots=True)
class PciExpressCapability(Capability):
    """PCI Express capability version 2 for an endpoint, 0x3C bytes."""

    CAP_ID: ClassVar[CapabilityId] = CapabilityId.PCI_EXPRESS
    SIZE: ClassVar[int] = 0x3C
    NAME: ClassVar[str] = "pcie"

    flr: bool = True
    max_payload: int = 512
    link_speed: int = 1
    """Link speed code: 1 = 2.5 GT/s."""
    link_width: int = 1

    def __post_init__(self) -> None:
        if self.max_payload not in (128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"max payload {self.max_payload} not a PCIe size")
        if not 1 <= self.link_speed <= 0xF or not 1 <= self.link_width <= 32:
            raise ValueError("link speed/width out of range")

    def body(self) -> tuple[Register, ...]:
        o = PcieOffset
        mps_code = self.max_payload.bit_length() - 8
        devcap = mps_code | DEVCAP_ROLE_BASED_ERROR | (DEVCAP_FLR if self.flr else 0)
        link = self.link_speed | (self.link_width << 4)
        return (
            Register("capabilities", o.CAPABILITIES, 2, PCIE_CAP_VERSION | PCIE_TYPE_ENDPOINT << 4),
            Register("device_capabilities", o.DEVICE_CAPABILITIES, 4, devcap),
            Register(
                "device_control",
                o.DEVICE_CONTROL,
                2,
                DEVCTL_RESET,
                writable=DEVCTL_WRITABLE,
                strobe=DEVCTL_INITIATE_FLR if self.flr else 0,
            ),
            Register("device_status", o.DEVICE_STATUS, 2, 0, w1c=DEVSTA_W1C),
            Register("link_capabilities", o.LINK_CAPABILITIES, 4, link),
            Register("link_control", o.LINK_CONTROL, 2, 0, writable=LNKCTL_WRITABLE),
            Register("link_status", o.LINK_STATUS, 2, link | LNKSTA_SLOT_CLOCK),
            Register("device_capabilities_2", o.DEVICE_CAPABILITIES_2, 4),
            Register("device_control_2", o.DEVICE_CONTROL_2, 2),
            Register("device_status_2", o.DEVICE_STATUS_2, 2),
            Register("link_capabilities_2", o.LINK_CAPABILITIES_2, 4),
            Register("link_control_2", o.LINK_CONTROL_2, 2),
            Register("link_status_2", o.LINK_STATUS_2, 2),
        )

    def watches(self, base: int) -> tuple[Watch, ...]:
        if not self.flr:
            return ()
        return (FlrWatch(base + PcieOffset.DEVICE_CONTROL, 2),)


# --- Power Management ----------------------------------------------------------


class PmOffset(enum.IntEnum):
    PMC = 0x02
    PMCSR = 0x04
    PMCSR_BSE = 0x06
    DATA = 0x07


PM_VERSION_1_2 = 0x3
PMC_D1 = 1 << 9
PMC_D2 = 1 << 10
PMCSR_STATE_MASK = 0x3
PMCSR_NO_SOFT_RESET = 1 << 3


@dataclass(frozen=True, slots=True)
class PowerStateWatch(Watch):
    """Drops writes of unsupported states (PM 1.2 3.2.4) and reports real transitions."""

    supported: frozenset[PowerState] = field(
        default_factory=lambda: frozenset({PowerState.D0, PowerState.D3HOT})
    )

    def constrain(self, old: int, new: int) -> int:
        if PowerState(new & PMCSR_STATE_MASK) in self.supported:
            return new
        return (new & ~PMCSR_STATE_MASK) | (old & PMCSR_STATE_MASK)

    def event(self, old: int, new: int, strobed: int) -> ConfigEvent | None:
        state = new & PMCSR_STATE_MASK
        if state == old & PMCSR_STATE_MASK:
            return None
        return PowerStateChanged(PowerState(state))


@dataclass(frozen=True, slots=True)
class PowerManagementCapability(Capability):
    """PCI Power Management 1.2, 8 bytes: PMC, PMCSR, PMCSR_BSE (0 on non-bridges), Data."""

    CAP_ID: ClassVar[CapabilityId] = CapabilityId.POWER_MANAGEMENT
    SIZE: ClassVar[int] = 8
    NAME: ClassVar[str] = "pm"

    no_soft_reset: bool = True
    d1: bool = False
    d2: bool = False

    @property
    def supported_states(self) -> frozenset[PowerState]:
        states = {PowerState.D0, PowerState.D3HOT}
        if self.d1:
            states.add(PowerState.D1)
        if self.d2:
            states.add(PowerState.D2)
        return frozenset(states)

    def body(self) -> tuple[Register, ...]:
        o = PmOffset
        pmc = PM_VERSION_1_2 | (PMC_D1 if self.d1 else 0) | (PMC_D2 if self.d2 else 0)
        pmcsr = PMCSR_NO_SOFT_RESET if self.no_soft_reset else 0
        return (
            Register("pmc", o.PMC, 2, pmc),
            Register("pmcsr", o.PMCSR, 2, pmcsr, writable=PMCSR_STATE_MASK),
            Register("pmcsr_bse", o.PMCSR_BSE, 1),
            Register("data", o.DATA, 1),
        )

    def watches(self, base: int) -> tuple[Watch, ...]:
        return (PowerStateWatch(base + PmOffset.PMCSR, 2, self.supported_states),)


# --- the chain -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacedCapability:
    offset: int
    capability: Capability


@dataclass(frozen=True, slots=True)
class CapabilityChain:
    """What the header needs (`pointer`) and what the config space needs (the rest)."""

    pointer: int
    registers: tuple[Register, ...]
    watches: tuple[Watch, ...]


def build_capability_chain(placed: Sequence[PlacedCapability]) -> CapabilityChain:
    """Link capabilities in list order (not offset order): any order is a valid list."""
    spans: list[tuple[int, int, str]] = []
    for p in placed:
        cap = p.capability
        end = p.offset + cap.SIZE
        if p.offset % 4 or p.offset < CAPABILITY_AREA_START or end > STANDARD_CONFIG_SIZE:
            raise ValueError(f"{cap.NAME} at {p.offset:#x}: must be dword-aligned in 0x40..0xFF")
        for lo, hi, name in spans:
            if p.offset < hi and lo < end:
                raise ValueError(f"{cap.NAME} at {p.offset:#x} overlaps {name} at {lo:#x}")
        spans.append((p.offset, end, cap.NAME))
    registers: list[Register] = []
    watches: list[Watch] = []
    for i, p in enumerate(placed):
        cap, base = p.capability, p.offset
        nxt = placed[i + 1].offset if i + 1 < len(placed) else 0
        registers.append(Register(f"{cap.NAME}.cap_id", base, 1, int(cap.CAP_ID)))
        registers.append(Register(f"{cap.NAME}.next", base + 1, 1, nxt))
        registers.extend(
            replace(r, name=f"{cap.NAME}.{r.name}", offset=base + r.offset) for r in cap.body()
        )
        watches.extend(cap.watches(base))
    pointer = placed[0].offset if placed else 0
    return CapabilityChain(pointer, tuple(registers), tuple(watches))


def capability_offsets(space: ConfigSpace) -> list[tuple[int, int]]:
    """Walk the list as a driver does: (capability ID, offset) pairs, loop-safe."""
    if not space.read_int(HeaderOffset.STATUS, 2) & StatusBits.CAPABILITIES_LIST:
        return []
    found: list[tuple[int, int]] = []
    ptr = space.read_int(HeaderOffset.CAPABILITIES_POINTER, 1) & ~0x3
    ttl = (STANDARD_CONFIG_SIZE - CAPABILITY_AREA_START) // 4
    while ptr >= CAPABILITY_AREA_START and ttl:
        found.append((space.read_int(ptr, 1), ptr))
        ptr = space.read_int(ptr + 1, 1) & ~0x3
        ttl -= 1
    return found


def find_capability(space: ConfigSpace, cap_id: int) -> int | None:
    return next((off for cid, off in capability_offsets(space) if cid == cap_id), None)

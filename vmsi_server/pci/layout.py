"""A function's whole config layout as one immutable value.

Why a data object rather than a builder with methods called in order: the
device, the session (region sizes, IRQ counts) and the tests all need the same
facts (which BAR holds the MSI-X table, where each capability sits), and a
frozen value can be shared and compared; `build()` is the only place those facts
turn into a mutable `ConfigSpace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from vmsi_server.pci.bars import BarKind, BarSpec, bar_registers, bar_watches
from vmsi_server.pci.capabilities import (
    Capability,
    CapabilityChain,
    MsixCapability,
    PlacedCapability,
    build_capability_chain,
)
from vmsi_server.pci.config_space import (
    CONFIG_SPACE_SIZE,
    STANDARD_CONFIG_SIZE,
    ConfigSpace,
    Register,
)
from vmsi_server.pci.header import PciIdentity, header_registers, header_watches

C = TypeVar("C", bound=Capability)


@dataclass(frozen=True, slots=True)
class PciFunctionLayout:
    """Identity, BARs and capabilities (in chain order) of one type 0 function."""

    identity: PciIdentity
    bars: tuple[BarSpec, ...]
    capabilities: tuple[PlacedCapability, ...]
    size: int = CONFIG_SPACE_SIZE

    def __post_init__(self) -> None:
        if self.size not in (STANDARD_CONFIG_SIZE, CONFIG_SPACE_SIZE):
            raise ValueError(f"config space size {self.size} is neither 256 nor 4096")
        self._chain()  # validates placement early, at declaration time
        bar_registers(self.bars)  # validates BAR slot overlap
        msix = self.capability(MsixCapability)
        if msix is not None:
            for what, bir, offset, length in (
                ("table", msix.table_bar, msix.table_offset, msix.table_bytes),
                ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_bytes),
            ):
                bar = self.bar(bir)
                if bar is None or bar.kind is BarKind.IO or offset + length > bar.size:
                    raise ValueError(f"MSI-X {what} does not fit a memory BAR{bir}")

    def _chain(self) -> CapabilityChain:
        return build_capability_chain(self.capabilities)

    def bar(self, index: int) -> BarSpec | None:
        return next((b for b in self.bars if b.index == index), None)

    def capability(self, kind: type[C]) -> C | None:
        return next(
            (p.capability for p in self.capabilities if isinstance(p.capability, kind)), None
        )

    def capability_offset(self, kind: type[Capability]) -> int | None:
        return next((p.offset for p in self.capabilities if isinstance(p.capability, kind)), None)

    def build(self) -> ConfigSpace:
        chain = self._chain()
        io_decode = any(b.kind is BarKind.IO for b in self.bars)
        registers: list[Register] = [
            *header_registers(
                self.identity, capabilities_pointer=chain.pointer, io_decode=io_decode
            ),
            *bar_registers(self.bars),
            *chain.registers,
        ]
        if self.size > STANDARD_CONFIG_SIZE:
            # A zero header at 0x100 is the valid "no extended capabilities" terminator.
            registers.append(Register("extended_capability_header", STANDARD_CONFIG_SIZE, 4))
        watches = [*header_watches(), *bar_watches(self.bars), *chain.watches]
        return ConfigSpace(registers, watches, self.size)

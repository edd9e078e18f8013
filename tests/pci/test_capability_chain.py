"""Placement rules for the capability list."""

from __future__ import annotations

import pytest

from vmsi_server.pci.capabilities import (
    MsixCapability,
    PciExpressCapability,
    PlacedCapability,
    PowerManagementCapability,
    build_capability_chain,
)
from vmsi_server.pci.config_space import PowerState, PowerStateChanged
from vmsi_server.pci.igbvf_layout import IGBVF_LAYOUT
from vmsi_server.pci.layout import PciFunctionLayout

from .helpers import rd, wr

MSIX = MsixCapability(3, 3, 0, 3, 0x2000)


@pytest.mark.parametrize(
    "placed",
    [
        [PlacedCapability(0x3C, PowerManagementCapability())],  # inside the header
        [PlacedCapability(0x52, PowerManagementCapability())],  # not dword aligned
        [PlacedCapability(0xF8, MSIX)],  # runs past 0xFF
        [
            PlacedCapability(0xC8, PowerManagementCapability()),
            PlacedCapability(0xA0, PciExpressCapability()),
        ],
        [PlacedCapability(0x70, MSIX), PlacedCapability(0x78, PowerManagementCapability())],
    ],
    ids=["in-header", "unaligned", "past-end", "pm-inside-pcie", "overlap"],
)
def test_bad_placements_are_rejected(placed: list[PlacedCapability]) -> None:
    with pytest.raises(ValueError):
        build_capability_chain(placed)


def test_next_pointers_follow_list_order() -> None:
    chain = build_capability_chain(
        [PlacedCapability(0xA0, PciExpressCapability()), PlacedCapability(0x70, MSIX)]
    )
    assert chain.pointer == 0xA0
    ids = {r.name: r.reset for r in chain.registers if r.name.endswith((".cap_id", ".next"))}
    assert ids == {"pcie.cap_id": 0x10, "pcie.next": 0x70, "msix.cap_id": 0x11, "msix.next": 0}
    assert all(
        r.writable == r.w1c == r.strobe == 0
        for r in chain.registers
        if r.size == 1 and r.name.endswith((".cap_id", ".next"))
    )


def test_empty_chain() -> None:
    chain = build_capability_chain([])
    assert chain.pointer == 0 and chain.registers == () and chain.watches == ()


def test_pm_with_d1_d2_accepts_them() -> None:
    pm = PowerManagementCapability(d1=True, d2=True)
    layout = PciFunctionLayout(IGBVF_LAYOUT.identity, (), (PlacedCapability(0x50, pm),))
    space = layout.build()
    assert rd(space, 0x52, 2) & 0x0600 == 0x0600
    assert wr(space, 0x54, 2, 2) == [PowerStateChanged(PowerState.D2)]
    assert wr(space, 0x54, 2, 1) == [PowerStateChanged(PowerState.D1)]


def test_pm_without_no_soft_reset() -> None:
    pm = PowerManagementCapability(no_soft_reset=False)
    layout = PciFunctionLayout(IGBVF_LAYOUT.identity, (), (PlacedCapability(0x50, pm),))
    assert rd(layout.build(), 0x54, 2) == 0


def test_layout_lookup_helpers() -> None:
    assert IGBVF_LAYOUT.capability_offset(MsixCapability) == 0x70
    assert IGBVF_LAYOUT.capability_offset(PciExpressCapability) == 0xA0
    msix = IGBVF_LAYOUT.capability(MsixCapability)
    assert msix is not None and msix.table_size == 3 and msix.pba_offset == 0x2000
    assert IGBVF_LAYOUT.bar(0) is not None and IGBVF_LAYOUT.bar(1) is None

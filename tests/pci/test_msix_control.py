"""Case 48: MSI-X Message Control under every access shape QEMU may forward."""

from __future__ import annotations

import pytest

from vmsi_server.pci.capabilities import MsixCapability, PlacedCapability
from vmsi_server.pci.config_space import ConfigSpace, MsixControlChanged
from vmsi_server.pci.igbvf_layout import IGBVF_LAYOUT
from vmsi_server.pci.layout import PciFunctionLayout

from .helpers import rd, wr

MSIX = 0x70
CTL = MSIX + 2
CAP_END = MSIX + 12
ENABLE, MASK = 0x8000, 0x4000

SHAPES = [
    (off, size)
    for size in (1, 2, 4)
    for off in range(MSIX - size + 1, CAP_END)  # every access overlapping the capability
]


@pytest.mark.parametrize(("offset", "size"), SHAPES)
def test_case48_every_shape_changes_only_enable_and_mask(
    space: ConfigSpace, offset: int, size: int
) -> None:
    before = space.read(0, 0x100)
    touches_high_byte = offset <= CTL + 1 < offset + size

    events = space.write(offset, b"\xff" * size)
    ctl = rd(space, CTL, 2)
    if touches_high_byte:
        assert ctl == 0x0002 | ENABLE | MASK
        assert events == [MsixControlChanged(enabled=True, function_masked=True)]
    else:
        assert ctl == 0x0002
        assert events == []
    after = space.read(0, 0x100)
    changed = [i for i in range(0x100) if after[i] != before[i]]
    assert changed == ([CTL + 1] if touches_high_byte else [])

    events = space.write(offset, b"\x00" * size)
    assert rd(space, CTL, 2) == 0x0002
    assert events == ([MsixControlChanged(False, False)] if touches_high_byte else [])
    assert space.read(0, 0x100) == before


def test_case48_two_byte_write_spanning_into_table_offset(space: ConfigSpace) -> None:
    """The high byte of Message Control plus the low byte of Table Offset/BIR."""
    assert space.write(CTL + 1, bytes([0x80, 0xFF])) == [MsixControlChanged(True, False)]
    assert rd(space, CTL, 2) == 0x8002
    assert rd(space, MSIX + 4, 4) == 0x00000003
    assert space.write(CTL + 1, bytes([0xC0, 0x00])) == [MsixControlChanged(True, True)]
    assert rd(space, MSIX + 4, 4) == 0x00000003


def test_case48_four_byte_write_at_capability_start(space: ConfigSpace) -> None:
    # What a dword RMW of the capability header looks like: ID/next/ctl with enable set.
    value = (0x8002 << 16) | (0xA0 << 8) | 0x11
    assert wr(space, MSIX, 4, value) == [MsixControlChanged(True, False)]
    assert rd(space, MSIX, 4) == value
    # A careless driver writing garbage into ID/next/table size changes none of them.
    assert wr(space, MSIX, 4, 0x47FF_0000) == [MsixControlChanged(False, True)]
    assert rd(space, MSIX, 4) == (0x4002 << 16) | (0xA0 << 8) | 0x11


def test_case48_events_only_when_enable_or_mask_change(space: ConfigSpace) -> None:
    assert wr(space, CTL, 2, MASK) == [MsixControlChanged(False, True)]
    assert wr(space, CTL, 2, MASK) == []
    assert wr(space, CTL, 2, MASK | 0x07FF) == []  # table size bits are read-only
    assert wr(space, CTL, 2, ENABLE | MASK) == [MsixControlChanged(True, True)]
    assert wr(space, CTL, 2, ENABLE) == [MsixControlChanged(True, False)]
    assert space.write(CTL, b"\x00") == []  # low byte holds neither bit


def test_case48_write_spanning_pm_to_msix_is_harmless(space: ConfigSpace) -> None:
    # An 8-byte write from 0x6C covers unused bytes and the whole capability header.
    events = space.write(0x6C, bytes(4) + bytes([0x00, 0x00, 0x02, 0x80]))
    assert events == [MsixControlChanged(True, False)]
    assert rd(space, MSIX, 2) == 0xA011


def test_table_size_reflects_vector_count() -> None:
    msix = MsixCapability(table_size=64, table_bar=3, table_offset=0, pba_bar=3, pba_offset=0x2000)
    layout = PciFunctionLayout(
        IGBVF_LAYOUT.identity, IGBVF_LAYOUT.bars, (PlacedCapability(MSIX, msix),)
    )
    assert rd(layout.build(), CTL, 2) == 63


@pytest.mark.parametrize(
    "kwargs",
    [
        {"table_size": 0},
        {"table_size": 2049},
        {"table_bar": 6},
        {"table_offset": 0x4},  # low 3 bits are the BIR
    ],
)
def test_msix_capability_rejects_bad_parameters(kwargs: dict[str, int]) -> None:
    args = {"table_size": 3, "table_bar": 3, "table_offset": 0, "pba_bar": 3, "pba_offset": 0x2000}
    args.update(kwargs)
    with pytest.raises(ValueError):
        MsixCapability(**args)


@pytest.mark.parametrize(
    ("table_bar", "table_offset"),
    [(2, 0), (3, 0x3FF8)],  # no BAR2; table runs past the 16 KiB BAR
)
def test_layout_rejects_msix_structures_outside_a_bar(table_bar: int, table_offset: int) -> None:
    msix = MsixCapability(3, table_bar, table_offset, 3, 0x2000)
    with pytest.raises(ValueError, match="MSI-X table"):
        PciFunctionLayout(IGBVF_LAYOUT.identity, IGBVF_LAYOUT.bars, (PlacedCapability(MSIX, msix),))

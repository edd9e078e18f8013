"""Case 47: BAR sizing as firmware, Linux and QEMU do it, plus BarChanged events."""

from __future__ import annotations

import pytest

from vmsi_server.pci.bars import BarKind, BarSpec, bar_address, bar_registers
from vmsi_server.pci.config_space import BarChanged, ConfigSpace
from vmsi_server.pci.header import PciIdentity
from vmsi_server.pci.igbvf_layout import IGBVF_LAYOUT
from vmsi_server.pci.layout import PciFunctionLayout

from .helpers import rd, wr

ONES = 0xFFFFFFFF


def size_bar(space: ConfigSpace, offset: int) -> int:
    """The classic probe: save, write all ones, read the mask, restore."""
    saved = rd(space, offset, 4)
    wr(space, offset, 4, ONES)
    mask = rd(space, offset, 4)
    wr(space, offset, 4, saved)
    assert rd(space, offset, 4) == saved
    return mask


def custom(*bars: BarSpec) -> ConfigSpace:
    identity = PciIdentity(0x1234, 0x5678, 0, 0xFF0000)
    return PciFunctionLayout(identity, bars, ()).build()


# --- the 82576 VF layout ----------------------------------------------------------


@pytest.mark.parametrize("low", [0x10, 0x1C])
def test_case47_igbvf_64bit_bars_size_both_halves(space: ConfigSpace, low: int) -> None:
    assert size_bar(space, low) == 0xFFFFC00C  # 16 KiB, 64-bit, prefetchable
    assert size_bar(space, low + 4) == 0xFFFFFFFF  # upper half of the mask


def test_case47_both_halves_written_together_as_qemu_does(space: ConfigSpace) -> None:
    space.write(0x10, b"\xff" * 8)
    mask64 = rd(space, 0x10, 8)
    assert mask64 == 0xFFFFFFFF_FFFFC00C
    size = ~(mask64 & ~0xF) + 1 & (1 << 64) - 1
    assert size == 16 * 1024


@pytest.mark.parametrize("unused", [0x18, 0x24])
def test_case47_unused_bars_read_zero_and_ignore_writes(space: ConfigSpace, unused: int) -> None:
    assert rd(space, unused, 4) == 0
    assert size_bar(space, unused) == 0
    wr(space, unused, 4, 0x12345678)
    assert rd(space, unused, 4) == 0


@pytest.mark.parametrize("probe", [0xFFFFFFFF, 0xFFFFF800])  # Linux, QEMU (~ROM enable)
def test_case47_no_rom_sizes_to_zero(space: ConfigSpace, probe: int) -> None:
    assert wr(space, 0x30, 4, probe) == []
    assert rd(space, 0x30, 4) == 0


def test_programmed_bar_reads_back_with_type_bits(space: ConfigSpace) -> None:
    wr(space, 0x1C, 4, 0xFEBF4000 | 0xF)  # low flag bits are read-only
    wr(space, 0x20, 4, 0x00000002)
    assert rd(space, 0x1C, 4) == 0xFEBF400C
    assert rd(space, 0x20, 4) == 0x00000002
    bar3 = IGBVF_LAYOUT.bar(3)
    assert bar3 is not None
    assert bar_address(space, bar3) == 0x2_FEBF4000


def test_unaligned_low_address_bits_are_dropped(space: ConfigSpace) -> None:
    wr(space, 0x10, 4, 0xFEBF2ABC)
    assert rd(space, 0x10, 4) == 0xFEBF000C


# --- BarChanged -----------------------------------------------------------------------


def test_bar_changed_follows_each_dword_of_a_64bit_bar(space: ConfigSpace) -> None:
    assert wr(space, 0x10, 4, 0xFEBF0000) == [BarChanged(0, 0xFEBF0000)]
    assert wr(space, 0x14, 4, 0x1) == [BarChanged(0, 0x1_FEBF0000)]
    assert wr(space, 0x14, 4, 0x1) == []  # same value, no event
    assert wr(space, 0x1C, 8, 0x3_0000_4000) == [BarChanged(3, 0x3_0000_4000)]


def test_bar_changed_during_sizing_reports_the_mask(space: ConfigSpace) -> None:
    assert wr(space, 0x10, 4, ONES) == [BarChanged(0, 0xFFFFC000)]
    assert wr(space, 0x10, 4, 0) == [BarChanged(0, 0)]


def test_flag_only_writes_do_not_report(space: ConfigSpace) -> None:
    assert wr(space, 0x10, 1, 0x0F) == []
    assert wr(space, 0x18, 4, ONES) == []


# --- other BAR kinds --------------------------------------------------------------------


def test_case47_mem32_bars() -> None:
    space = custom(
        BarSpec(0, 4096, BarKind.MEM32),
        BarSpec(1, 1 << 20, BarKind.MEM32, prefetchable=True),
    )
    assert rd(space, 0x10, 4) == 0
    assert size_bar(space, 0x10) == 0xFFFFF000
    assert size_bar(space, 0x14) == 0xFFF00008
    assert wr(space, 0x10, 4, 0xE0001000) == [BarChanged(0, 0xE0001000)]


def test_case47_io_bar_and_io_decode_bit() -> None:
    space = custom(BarSpec(5, 32, BarKind.IO))
    assert rd(space, 0x24, 4) == 0x1
    assert size_bar(space, 0x24) == 0xFFFFFFE1
    assert wr(space, 0x24, 4, 0xC040) == [BarChanged(5, 0xC040)]
    wr(space, 0x04, 2, 0x0001)
    assert rd(space, 0x04, 2) & 0x1  # I/O Space is writable once there is an I/O BAR


def test_case47_64bit_bar_above_4gib_has_read_only_low_address() -> None:
    space = custom(BarSpec(2, 8 << 30, BarKind.MEM64))
    assert size_bar(space, 0x18) == 0x00000004
    assert size_bar(space, 0x1C) == 0xFFFFFFFE


@pytest.mark.parametrize(
    "spec_args",
    [
        (0, 3000, BarKind.MEM32, False),  # not a power of two
        (0, 8, BarKind.MEM32, False),  # below 16 bytes
        (0, 16, BarKind.IO, True),  # prefetchable I/O
        (0, 512, BarKind.IO, False),  # I/O above 256 bytes
        (5, 4096, BarKind.MEM64, False),  # no slot for the upper half
        (6, 4096, BarKind.MEM32, False),  # no such BAR
    ],
)
def test_bar_spec_rejects_impossible_bars(spec_args: tuple[int, int, BarKind, bool]) -> None:
    index, size, kind, prefetchable = spec_args
    with pytest.raises(ValueError):
        BarSpec(index, size, kind, prefetchable)


def test_bar_slot_overlap_is_rejected() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        bar_registers([BarSpec(0, 4096, BarKind.MEM64), BarSpec(1, 4096)])

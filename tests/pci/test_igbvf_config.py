"""The 82576 VF config space as QEMU and the igbvf driver see it.

Conformance cases 45, 46 and 49 of reference/vfio-user-protocol.md section 12,
plus header, RW1C, capability-list, Command, PM and reset behaviour. Expected
values are written out from the PCI/PCIe specs and reference/igbvf.md, not read
back from the implementation's tables.
"""

from __future__ import annotations

import pytest

from vmsi_server.pci.capabilities import (
    PciExpressCapability,
    PlacedCapability,
    capability_offsets,
    find_capability,
)
from vmsi_server.pci.config_space import (
    CONFIG_SPACE_SIZE,
    CommandChanged,
    ConfigSpace,
    FunctionLevelReset,
    PowerState,
    PowerStateChanged,
)
from vmsi_server.pci.igbvf_layout import IGBVF_LAYOUT
from vmsi_server.pci.layout import PciFunctionLayout

from .helpers import rd, wr

MSIX, PCIE, PM = 0x70, 0xA0, 0x50

# Bits the guest can set and clear, per spec, as (offset, size, mask). Every
# other bit of the 4 KiB space must resist both 0xFF and 0x00 writes.
EXPECTED_WRITABLE = [
    (0x04, 2, 0x0546),  # Command: MEM, BME, parity, SERR, INTx disable (no I/O BAR)
    (0x0C, 1, 0xFF),  # Cache Line Size
    (0x10, 4, 0xFFFFC000),  # BAR0, 16 KiB
    (0x14, 4, 0xFFFFFFFF),  # BAR1 = BAR0 upper
    (0x1C, 4, 0xFFFFC000),  # BAR3, 16 KiB
    (0x20, 4, 0xFFFFFFFF),  # BAR4 = BAR3 upper
    (0x3C, 1, 0xFF),  # Interrupt Line
    (PM + 4, 2, 0x0003),  # PMCSR PowerState (D0 <-> D3hot)
    (MSIX + 2, 2, 0xC000),  # MSI-X Message Control: enable, function mask
    (PCIE + 8, 2, 0x79FF),  # Device Control (FLR strobe reads 0)
    (PCIE + 0x10, 2, 0x00C0),  # Link Control: common clock, extended synch
]


def expected_writable_bytes() -> bytes:
    out = bytearray(CONFIG_SPACE_SIZE)
    for offset, size, mask in EXPECTED_WRITABLE:
        out[offset : offset + size] = mask.to_bytes(size, "little")
    return bytes(out)


def test_identity_and_fixed_header_fields(space: ConfigSpace) -> None:
    assert rd(space, 0x00, 2) == 0x8086
    assert rd(space, 0x02, 2) == 0x10CA
    assert rd(space, 0x08, 1) == 0x01
    assert space.read(0x09, 3) == bytes([0x00, 0x00, 0x02])  # prog-if, subclass, class
    assert rd(space, 0x0E, 1) == 0x00  # header type 0, single function
    assert rd(space, 0x0F, 1) == 0x00  # BIST
    assert rd(space, 0x2C, 2) == 0x8086
    assert rd(space, 0x3D, 1) == 0  # Interrupt Pin: a VF has no INTx
    assert rd(space, 0x04, 2) == 0
    assert rd(space, 0x06, 2) == 0x0010  # only Capabilities List
    assert rd(space, 0x34, 1) == PM
    assert rd(space, 0x10, 4) == 0x0000000C  # 64-bit prefetchable memory
    assert rd(space, 0x1C, 4) == 0x0000000C


def test_extended_space_starts_with_a_terminator(space: ConfigSpace) -> None:
    assert rd(space, 0x100, 4) == 0
    assert space.read(0x100, CONFIG_SPACE_SIZE - 0x100) == bytes(CONFIG_SPACE_SIZE - 0x100)


# --- case 45: reads of any size and alignment -------------------------------------


def _dirty(space: ConfigSpace) -> None:
    wr(space, 0x04, 2, 0x0006)
    wr(space, 0x10, 4, 0xFEBF0000)
    wr(space, 0x14, 4, 0x00000001)
    wr(space, 0x1C, 4, 0xFEBF4000)
    wr(space, MSIX + 2, 2, 0xC000)
    wr(space, 0x3C, 1, 0x0B)


@pytest.mark.parametrize("dirty", [False, True], ids=["power-on", "programmed"])
def test_case45_reads_of_every_size_and_alignment_agree(space: ConfigSpace, dirty: bool) -> None:
    if dirty:
        _dirty(space)
    image = space.read(0, CONFIG_SPACE_SIZE)
    assert len(image) == CONFIG_SPACE_SIZE
    assert image == b"".join(space.read(off, 4) for off in range(0, CONFIG_SPACE_SIZE, 4))
    for size in (1, 2, 3, 4, 8, 13):
        for off in range(CONFIG_SPACE_SIZE - size + 1):
            assert space.read(off, size) == image[off : off + size], (off, size)
    # Reads have no side effects.
    assert space.read(0, CONFIG_SPACE_SIZE) == image


# --- case 46: read-only bits and capability ID/next bytes --------------------------


def test_case46_only_spec_writable_bits_move(space: ConfigSpace) -> None:
    """Probe every byte with 0xFF then 0x00; a bit is writable iff it followed both."""
    expected = expected_writable_bytes()
    power_on = space.read(0, CONFIG_SPACE_SIZE)
    for off in range(CONFIG_SPACE_SIZE):
        space.reset()
        space.write(off, b"\xff")
        after_ones = space.read(off, 1)[0]
        space.write(off, b"\x00")
        after_zeros = space.read(off, 1)[0]
        writable = after_ones & ~after_zeros & 0xFF
        assert writable == expected[off], f"byte {off:#x}: {writable:#04x} != {expected[off]:#04x}"
        # Read-only bits keep their power-on value through both writes.
        ro = ~expected[off] & 0xFF
        assert after_ones & ro == power_on[off] & ro, f"byte {off:#x} RO bits moved"
        assert after_zeros & ro == power_on[off] & ro, f"byte {off:#x} RO bits moved"
        # Nothing outside the written byte changed.
        others = space.read(0, CONFIG_SPACE_SIZE)
        assert others[:off] == power_on[:off] and others[off + 1 :] == power_on[off + 1 :]


@pytest.mark.parametrize("cap", [PM, MSIX, PCIE])
@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("value", [0x00, 0xFF, 0x5A])
def test_case46_capability_id_and_next_bytes_are_read_only(
    space: ConfigSpace, cap: int, size: int, value: int
) -> None:
    before = space.read(cap, 2)
    space.write(cap, bytes([value]) * size)
    if size == 1:
        space.write(cap + 1, bytes([value]))
    assert space.read(cap, 2) == before


def test_case46_whole_space_write_keeps_identity_and_chain(space: ConfigSpace) -> None:
    space.write(0, b"\xff" * CONFIG_SPACE_SIZE)
    assert rd(space, 0x00, 4) == 0x10CA8086
    assert rd(space, 0x08, 4) == 0x02000001
    assert rd(space, 0x34, 1) == PM
    assert rd(space, 0x3D, 1) == 0
    assert [(rd(space, c, 1), rd(space, c + 1, 1)) for c in (PM, MSIX, PCIE)] == [
        (0x01, MSIX),
        (0x11, PCIE),
        (0x10, 0x00),
    ]
    assert rd(space, MSIX + 4, 4) == 0x00000003
    assert rd(space, MSIX + 8, 4) == 0x00002003
    assert rd(space, MSIX + 2, 2) == 0xC002
    assert rd(space, 0x100, 4) == 0


# --- Status RW1C ------------------------------------------------------------------


def test_status_error_bits_are_rw1c_and_capabilities_list_stays(space: ConfigSpace) -> None:
    errors = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000
    space.device_write(0x06, (0x0010 | errors).to_bytes(2, "little"))
    wr(space, 0x06, 2, 0x0000)
    assert rd(space, 0x06, 2) == 0x0010 | errors
    wr(space, 0x06, 2, 0x2000)  # acknowledge received master abort only
    assert rd(space, 0x06, 2) == 0x0010 | (errors & ~0x2000)
    space.write(0x07, b"\x01")  # byte write clears bit 8
    assert rd(space, 0x06, 2) == 0x0010 | (errors & ~0x2100)
    wr(space, 0x06, 2, 0xFFFF)
    assert rd(space, 0x06, 2) == 0x0010


def test_status_w1c_cannot_set_bits(space: ConfigSpace) -> None:
    wr(space, 0x06, 2, 0xFFFF)
    assert rd(space, 0x06, 2) == 0x0010
    # A Command dword write (status in the upper half, as Linux does) leaves it alone.
    wr(space, 0x04, 4, 0xF900_0006)
    assert rd(space, 0x06, 2) == 0x0010


def test_pcie_device_status_error_bits_are_rw1c(space: ConfigSpace) -> None:
    space.device_write(PCIE + 0x0A, (0x000F).to_bytes(2, "little"))
    wr(space, PCIE + 0x0A, 2, 0x0005)
    assert rd(space, PCIE + 0x0A, 2) == 0x000A
    wr(space, PCIE + 0x0A, 2, 0xFFFF)
    assert rd(space, PCIE + 0x0A, 2) == 0


# --- capability list ----------------------------------------------------------------


def test_capability_walk_from_0x34_reaches_pm_msix_pcie_and_terminates(space: ConfigSpace) -> None:
    assert rd(space, 0x06, 2) & 0x0010
    seen: list[tuple[int, int]] = []
    ptr = rd(space, 0x34, 1)
    while ptr:
        assert ptr % 4 == 0 and 0x40 <= ptr < 0x100
        assert len(seen) < 48, "capability list loops"
        seen.append((rd(space, ptr, 1), ptr))
        ptr = rd(space, ptr + 1, 1)
    assert seen == [(0x01, PM), (0x11, MSIX), (0x10, PCIE)]
    assert capability_offsets(space) == seen
    assert find_capability(space, 0x11) == MSIX
    assert find_capability(space, 0x05) is None


def test_msix_capability_contents(space: ConfigSpace) -> None:
    assert rd(space, MSIX + 2, 2) == 0x0002  # 3 vectors, disabled, unmasked
    assert rd(space, MSIX + 4, 4) == 0x00000003  # BAR3 + 0
    assert rd(space, MSIX + 8, 4) == 0x00002003  # BAR3 + 0x2000


def test_pcie_capability_contents(space: ConfigSpace) -> None:
    assert rd(space, PCIE + 2, 2) == 0x0002  # version 2, endpoint
    devcap = rd(space, PCIE + 4, 4)
    assert devcap & (1 << 28), "FLR capable"
    assert devcap & 0x7 == 2, "max payload 512"
    link = rd(space, PCIE + 0x0C, 4)
    assert link & 0xF == 1 and (link >> 4) & 0x3F == 1, "x1 at 2.5 GT/s"
    status = rd(space, PCIE + 0x12, 2)
    assert status & 0xF == 1 and (status >> 4) & 0x3F == 1
    assert rd(space, PCIE + 0x24, 4) == 0  # Device Capabilities 2


def test_pm_capability_contents(space: ConfigSpace) -> None:
    assert rd(space, PM + 2, 2) & 0x7 == 3  # PM 1.2
    assert rd(space, PM + 2, 2) & 0x0600 == 0  # no D1/D2
    assert rd(space, PM + 4, 2) == 0x0008  # D0, No_Soft_Reset


def test_chain_order_is_the_declared_order_not_offset_order() -> None:
    caps = IGBVF_LAYOUT.capabilities
    reordered = PciFunctionLayout(IGBVF_LAYOUT.identity, IGBVF_LAYOUT.bars, (caps[2], caps[1]))
    space = reordered.build()
    assert capability_offsets(space) == [(0x10, PCIE), (0x11, MSIX)]
    assert rd(space, 0x34, 1) == PCIE
    assert rd(space, PM, 2) == 0  # PM not placed: plain zeros


def test_no_capabilities_means_no_status_bit_and_null_pointer() -> None:
    layout = PciFunctionLayout(IGBVF_LAYOUT.identity, (), ())
    space = layout.build()
    assert rd(space, 0x06, 2) & 0x0010 == 0
    assert rd(space, 0x34, 1) == 0
    assert capability_offsets(space) == []


# --- Command ----------------------------------------------------------------------


def test_command_changes_produce_events(space: ConfigSpace) -> None:
    events = wr(space, 0x04, 2, 0x0006)
    assert events == [CommandChanged(0x0000, 0x0006)]
    event = events[0]
    assert isinstance(event, CommandChanged) and event.memory_enabled and event.bus_master
    assert wr(space, 0x04, 2, 0x0006) == []  # no change, no event
    assert space.write(0x04, b"\x02") == [CommandChanged(0x0006, 0x0002)]
    assert wr(space, 0x04, 2, 0xFFFF) == [CommandChanged(0x0002, 0x0546)]
    assert rd(space, 0x04, 2) == 0x0546  # I/O Space stays 0: no I/O BAR


def test_command_dword_write_with_status_gives_one_event(space: ConfigSpace) -> None:
    assert wr(space, 0x04, 4, 0xFFFF_0406) == [CommandChanged(0, 0x0406)]


# --- case 49: FLR -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size", "value"),
    [
        (PCIE + 8, 2, 0x8000 | 0x2810),  # Linux: RMW of Device Control with BCR_FLR
        (PCIE + 9, 1, 0x80),  # high byte only
        (PCIE + 8, 4, 0x0000_8000),  # dword with Device Status
        (PCIE + 4, 8, 0x8000 << 32),  # qword from Device Capabilities
    ],
)
def test_case49_initiate_flr_emits_reset_and_reads_back_zero(
    space: ConfigSpace, offset: int, size: int, value: int
) -> None:
    assert wr(space, offset, size, value) == [FunctionLevelReset()]
    assert rd(space, PCIE + 8, 2) & 0x8000 == 0
    assert rd(space, PCIE + 4, 4) & (1 << 28)  # Device Capabilities untouched


def test_device_control_writes_without_flr_do_not_reset(space: ConfigSpace) -> None:
    assert wr(space, PCIE + 8, 2, 0x0000) == []
    assert wr(space, PCIE + 8, 2, 0x7FFF) == []
    assert rd(space, PCIE + 8, 2) == 0x79FF


def test_flr_not_advertised_means_no_reset() -> None:
    caps = (PlacedCapability(PCIE, PciExpressCapability(flr=False)),)
    space = PciFunctionLayout(IGBVF_LAYOUT.identity, IGBVF_LAYOUT.bars, caps).build()
    assert rd(space, PCIE + 4, 4) & (1 << 28) == 0
    assert wr(space, PCIE + 8, 2, 0xFFFF) == []
    assert rd(space, PCIE + 8, 2) & 0x8000 == 0


def test_flr_then_reset_returns_to_power_on(space: ConfigSpace) -> None:
    power_on = space.read(0, CONFIG_SPACE_SIZE)
    _dirty(space)
    assert space.read(0, CONFIG_SPACE_SIZE) != power_on
    assert wr(space, PCIE + 8, 2, 0x8000) == [FunctionLevelReset()]
    space.reset()
    assert space.read(0, CONFIG_SPACE_SIZE) == power_on


# --- Power management ----------------------------------------------------------------


def test_power_state_d3hot_and_back(space: ConfigSpace) -> None:
    assert wr(space, PM + 4, 2, 0x0003) == [PowerStateChanged(PowerState.D3HOT)]
    assert rd(space, PM + 4, 2) == 0x000B
    assert wr(space, PM + 4, 2, 0x0003) == []
    assert wr(space, PM + 4, 2, 0x0000) == [PowerStateChanged(PowerState.D0)]
    assert rd(space, PM + 4, 2) == 0x0008


@pytest.mark.parametrize("state", [1, 2])
def test_unsupported_power_states_are_discarded(space: ConfigSpace, state: int) -> None:
    assert wr(space, PM + 4, 2, state) == []
    assert rd(space, PM + 4, 2) & 0x3 == 0
    wr(space, PM + 4, 2, 3)
    assert wr(space, PM + 4, 2, state) == []
    assert rd(space, PM + 4, 2) & 0x3 == 3


# --- reset ------------------------------------------------------------------------------


def test_reset_restores_power_on_after_everything(space: ConfigSpace) -> None:
    fresh = IGBVF_LAYOUT.build().read(0, CONFIG_SPACE_SIZE)
    _dirty(space)
    wr(space, PM + 4, 2, 3)
    wr(space, PCIE + 8, 2, 0x00FF)
    space.device_write(0x06, b"\x10\xf9")
    space.write(0, b"\xff" * CONFIG_SPACE_SIZE)
    assert space.read(0, CONFIG_SPACE_SIZE) != fresh
    space.reset()
    assert space.read(0, CONFIG_SPACE_SIZE) == fresh


def test_describe_lists_registers_with_values(space: ConfigSpace) -> None:
    wr(space, 0x04, 2, 0x0006)
    text = space.describe()
    assert "msix.message_control" in text
    assert "pcie.device_control" in text
    line = next(ln for ln in text.splitlines() if " command " in ln)
    assert "= 0x0006" in line

"""The BAR0 register table and its dispatch: access kinds, undefined offsets, access sizes."""

from __future__ import annotations

import errno

import pytest
from nic_fakes import FakeLoop
from structlog.testing import capture_logs

from vmsi_server.nic import registers as r
from vmsi_server.nic.pf import Pf
from vmsi_server.nic.registers import (
    BY_NAME,
    BY_OFFSET,
    REGISTERS,
    Access,
    Register,
    RegisterFile,
)
from vmsi_server.nic.vf_core import VfCore
from vmsi_server.pci.function import AccessError

# -- fakes (unit-test only) -------------------------------------------------------------------
# (the timer loop is nic_fakes.FakeLoop, shared by the NIC tests)


class FakeTx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0
        self.doorbells = 0
        self.resets = 0

    def doorbell(self) -> int:
        self.doorbells += 1
        return 0

    def reset(self) -> None:
        self.resets += 1
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0


class FakeRx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0
        self.tails = 0
        self.resets = 0

    def tail_written(self) -> int:
        self.tails += 1
        return 0

    def reset(self) -> None:
        self.resets += 1
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0


def make_core() -> tuple[VfCore, list[int]]:
    delivered: list[int] = []
    core = VfCore(Pf(), 0, delivered.append, FakeLoop(), FakeTx(), FakeRx(), clock=lambda: 0.0)
    return core, delivered


# -- the table itself ---------------------------------------------------------------------------

EXPECTED = {
    "CTRL": 0x0000,
    "STATUS": 0x0008,
    "ITR": 0x00C4,
    "V2PMAILBOX": 0x0C40,
    "VFGPRC": 0x0F10,
    "VFGPTC": 0x0F14,
    "VFGORC": 0x0F18,
    "VFGOTC": 0x0F34,
    "VFMPRC": 0x0F3C,
    "VFGPRLBC": 0x0F40,
    "VFGPTLBC": 0x0F44,
    "VFGORLBC": 0x0F48,
    "VFGOTLBC": 0x0F50,
    "EICS": 0x1520,
    "EIMS": 0x1524,
    "EIMC": 0x1528,
    "EIAC": 0x152C,
    "EIAM": 0x1530,
    "EICR": 0x1580,
    "EITR0": 0x1680,
    "EITR1": 0x1684,
    "EITR2": 0x1688,
    "IVAR0": 0x1700,
    "IVAR_MISC": 0x1740,
    "RDBAL0": 0x2800,
    "RDBAH0": 0x2804,
    "RDLEN0": 0x2808,
    "SRRCTL0": 0x280C,
    "RDH0": 0x2810,
    "DCA_RXCTRL0": 0x2814,
    "RDT0": 0x2818,
    "RXDCTL0": 0x2828,
    "TDBAL0": 0x3800,
    "TDBAH0": 0x3804,
    "TDLEN0": 0x3808,
    "TDH0": 0x3810,
    "DCA_TXCTRL0": 0x3814,
    "TDT0": 0x3818,
    "TXDCTL0": 0x3828,
    **{f"VMBMEM{i}": 0x0800 + 4 * i for i in range(16)},
}


def test_table_matches_the_reference_map() -> None:
    assert {reg.name: reg.offset for reg in REGISTERS} == EXPECTED
    assert len(BY_OFFSET) == len(REGISTERS)  # no offset declared twice


def test_table_access_kinds_match_the_reference() -> None:
    kinds = {reg.name: reg.access for reg in REGISTERS}
    assert kinds["STATUS"] is Access.RO
    assert kinds["EICR"] is Access.RC
    assert kinds["EICS"] is Access.W1S and BY_NAME["EICS"].target == r.EICR
    assert kinds["EIMS"] is Access.W1S and BY_NAME["EIMS"].target is None
    assert kinds["EIMC"] is Access.W1C and BY_NAME["EIMC"].target == r.EIMS
    assert all(kinds[f"VFG{n}"] is Access.RO for n in ("PRC", "PTC", "ORC", "OTC"))
    assert BY_NAME["V2PMAILBOX"].read_clear == 0xB0
    assert BY_NAME["CTRL"].self_clear == 0x0400_0000
    assert BY_NAME["EICR"].read_clear == 0xFFFF_FFFF


def test_register_rejects_unaligned_or_out_of_bar_offsets() -> None:
    with pytest.raises(ValueError):
        Register(0x2, "X", Access.RW)
    with pytest.raises(ValueError):
        Register(0x4000, "X", Access.RW)


# -- generic kinds on a synthetic table -------------------------------------------------------

SYNTH = (
    Register(0x00, "RW", Access.RW, write_mask=0x0000_FFFF, self_clear=0x8000),
    Register(0x04, "RO", Access.RO, reset=0x1234),
    Register(0x08, "WO", Access.WO),
    Register(0x0C, "RC", Access.RC),
    Register(0x10, "RWRC", Access.RW, read_clear=0xF0),
    Register(0x14, "SET", Access.W1S, write_mask=0x7),
    Register(0x18, "SETT", Access.W1S, write_mask=0x7, target=0x0C),
    Register(0x1C, "CLRT", Access.W1C, write_mask=0x7, target=0x14),
)


def test_generic_rw_masks_and_self_clears() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[0](0xFFFF_FFFF)
    assert rf.readers[0]() == 0x7FFF  # mask kept the low 16 bits, bit 15 self-cleared


def test_generic_ro_ignores_writes_and_keeps_reset_value() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[1](0)
    assert rf.readers[1]() == 0x1234
    assert rf.ignored_writes == 1


def test_generic_wo_reads_zero_but_stores() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[2](0x55)
    assert rf.readers[2]() == 0
    assert rf.values[2] == 0x55


def test_generic_rc_clears_on_read_and_w1s_target_sets_it() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[6](0xFF)  # SETT -> RC at 0x0C, masked to 3 bits
    assert rf.readers[6]() == 0  # no storage of its own
    assert rf.readers[3]() == 0x7
    assert rf.readers[3]() == 0


def test_generic_partial_read_clear() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[4](0xFF)
    assert rf.readers[4]() == 0xFF
    assert rf.readers[4]() == 0x0F


def test_generic_w1s_accumulates_and_w1c_target_clears() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    rf.writers[5](0x1)
    rf.writers[5](0x4)
    assert rf.readers[5]() == 0x5
    rf.writers[7](0x4)
    assert rf.readers[5]() == 0x1
    assert rf.readers[7]() == 0


def test_undefined_offsets_read_zero_ignore_writes_and_log_once() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    with capture_logs() as logs:
        rf.writers[0x30 >> 2](0xDEAD)
        assert rf.readers[0x30 >> 2]() == 0
        assert rf.readers[0x30 >> 2]() == 0
    assert rf.undefined_writes == 1
    assert rf.undefined_reads == 2
    unknown = [e for e in logs if e["event"] == "nic.reg.unknown"]
    assert len(unknown) == 1
    assert unknown[0]["offset"] == "0x0030"
    assert unknown[0]["log_level"] == "debug"


def test_define_twice_is_refused() -> None:
    rf = RegisterFile(SYNTH, size=0x40)
    with pytest.raises(ValueError):
        rf.define(Register(0x00, "AGAIN", Access.RW))


# -- the VF's BAR0 --------------------------------------------------------------------------


def test_power_on_values_match_declared_reset_values() -> None:
    core, _ = make_core()
    for reg in REGISTERS:
        expected = 0 if reg.target is not None else reg.reset
        assert core.read(reg.offset, 4) == expected, reg.name
    # V2PMAILBOX's RSTD was read once above: it is gone now
    assert core.read(r.V2PMAILBOX, 4) == 0


def test_every_declared_register_is_bound_not_undefined() -> None:
    core, _ = make_core()
    for reg in REGISTERS:
        core.read(reg.offset, 4)
    assert core.registers.undefined_reads == 0


PLAIN_RW = [
    reg
    for reg in REGISTERS
    if reg.access is Access.RW and reg.name not in ("CTRL", "V2PMAILBOX") and not reg.read_clear
]


@pytest.mark.parametrize("reg", PLAIN_RW, ids=lambda reg: reg.name)
def test_rw_registers_round_trip_through_their_owner(reg: Register) -> None:
    core, _ = make_core()
    core.write(reg.offset, 4, 0xFFFF_FFFF)
    assert core.read(reg.offset, 4) == reg.stored(0xFFFF_FFFF)
    core.write(reg.offset, 4, 0)
    assert core.read(reg.offset, 4) == 0


def test_ring_registers_apply_hardware_masks() -> None:
    core, _ = make_core()
    core.write(r.TDLEN0, 4, 16384 + 0x7F)
    assert core.read(r.TDLEN0, 4) == 16384  # 128-byte multiple
    core.write(r.RDLEN0, 4, 4096 + 0x10)
    assert core.read(r.RDLEN0, 4) == 4096
    core.write(r.RDH0, 4, 0x1_0005)
    assert core.read(r.RDH0, 4) == 5


@pytest.mark.parametrize("name", ["STATUS", "VFGPRC", "VFGOTLBC", "EICR"])
def test_read_only_registers_ignore_writes(name: str) -> None:
    core, _ = make_core()
    before = core.read(BY_NAME[name].offset, 4)
    core.write(BY_NAME[name].offset, 4, 0xFFFF_FFFF)
    assert core.read(BY_NAME[name].offset, 4) == before


def test_ctrl_rst_self_clears_and_other_bits_stick() -> None:
    core, _ = make_core()
    core.write(r.CTRL, 4, 0x0000_0040 | r.CTRL_RST)
    assert core.read(r.CTRL, 4) == 0x0000_0040
    assert core.resets == 1


def test_write_only_registers_read_zero() -> None:
    core, _ = make_core()
    core.write(r.EIMS, 4, 0x7)
    assert core.read(r.EIMC, 4) == 0
    assert core.read(r.EICS, 4) == 0
    assert core.read(r.EIMS, 4) == 0x7


@pytest.mark.parametrize("size", [1, 2, 8])
def test_only_dword_accesses_are_accepted(size: int) -> None:
    core, _ = make_core()
    with pytest.raises(AccessError) as read_err:
        core.read(r.STATUS, size)
    assert read_err.value.errno == errno.EINVAL
    with pytest.raises(AccessError) as write_err:
        core.write(r.EIMS, size, 0x7)
    assert write_err.value.errno == errno.EINVAL
    assert core.read(r.EIMS, 4) == 0  # the refused write had no effect


def test_unaligned_and_out_of_bar_accesses_are_refused() -> None:
    core, _ = make_core()
    with pytest.raises(AccessError):
        core.read(r.STATUS + 2, 4)
    with pytest.raises(AccessError):
        core.write(r.BAR0_SIZE, 4, 0)
    with pytest.raises(AccessError):
        core.read(-4, 4)
    assert core.invalid_accesses == 3


def test_vf_undefined_offsets_read_zero_and_ignore_writes() -> None:
    core, _ = make_core()
    core.write(0x0010, 4, 0x1234)
    core.write(0x0004, 4, 0xFFFF_FFFF)
    assert core.read(0x0004, 4) == 0
    assert core.read(0x3FFC, 4) == 0
    assert core.registers.undefined_writes == 2
    assert core.registers.undefined_reads == 2


def test_status_reports_link() -> None:
    core, _ = make_core()
    assert core.read(r.STATUS, 4) == 0x83
    core.set_link(False)
    assert core.read(r.STATUS, 4) == 0x81

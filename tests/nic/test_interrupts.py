"""Interrupt unit: EICR/EICS/EIMS/EIMC/EIAC/EIAM, IVAR routing, EITR throttling (igbvf.md §6)."""

from __future__ import annotations

import pytest
from nic_fakes import FakeLoop

from vmsi_server.nic import registers as r
from vmsi_server.nic.interrupts import EITR_UNIT_S, InterruptUnit, ivar_vector_bit
from vmsi_server.nic.pf import Pf
from vmsi_server.nic.vf_core import VfCore

# -- fakes (unit-test only) -------------------------------------------------------------------
# (the timer loop is nic_fakes.FakeLoop, shared by the NIC tests)


class FakeTx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0
        self.completions = 0

    def doorbell(self) -> int:
        return self.completions

    def reset(self) -> None:
        self.head = self.tail = self.txdctl = 0


class FakeRx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0

    def tail_written(self) -> int:
        return 0

    def reset(self) -> None:
        self.head = self.tail = self.rxdctl = 0


def make_unit() -> tuple[InterruptUnit, FakeLoop, list[int]]:
    loop = FakeLoop()
    sent: list[int] = []
    unit = InterruptUnit(sent.append, loop, clock=lambda: loop.now)
    return unit, loop, sent


def igbvf_open(unit: InterruptUnit) -> None:
    """What igbvf_configure_msix + igbvf_irq_enable leave behind (§6.1, §6.2)."""
    unit.write_ivar0(0x8081)
    unit.write_ivar_misc(0x82)
    unit.write_eiac(0x7)
    unit.write_eiam(0x7)
    unit.write_eims(0x7)


# -- enables, software interrupts, read-to-clear -----------------------------------------------


def test_eims_sets_eimc_clears_and_only_three_vectors_exist() -> None:
    unit, _, _ = make_unit()
    unit.write_eims(0xFFFF_FFFF)
    assert unit.read_eims() == 0x7
    unit.write_eimc(0x2)
    assert unit.read_eims() == 0x5
    unit.write_eimc(0xFFFF_FFFF)
    assert unit.read_eims() == 0


def test_masked_cause_stays_pending_until_eims_rearms() -> None:
    unit, _, sent = make_unit()
    unit.raise_cause(0x2)
    assert sent == []
    assert unit.eicr == 0x2
    unit.write_eims(0x2)
    assert sent == [1]


def test_eics_sets_causes_and_sends_enabled_vectors() -> None:
    unit, _, sent = make_unit()
    unit.write_eims(0x2)
    unit.write_eics(0x3)
    assert sent == [1]  # vector 0 is not enabled
    assert unit.eicr == 0x3  # EIAC = 0: nothing auto-cleared


def test_eicr_read_returns_pending_and_clears() -> None:
    unit, _, _ = make_unit()
    unit.raise_cause(0x5)
    assert unit.read_eicr() == 0x5
    assert unit.read_eicr() == 0


def test_eims_write_does_not_resend_a_vector_without_a_pending_cause() -> None:
    unit, _, sent = make_unit()
    unit.write_eims(0x7)
    unit.write_eims(0x7)
    assert sent == []


# -- routing ------------------------------------------------------------------------------------


def test_ivar_routing_as_igbvf_programs_it() -> None:
    unit, _, sent = make_unit()
    igbvf_open(unit)
    unit.raise_tx()
    unit.raise_rx()
    unit.raise_misc()
    assert sent == [0, 1, 2]  # misc goes to vector 2, not QEMU's vector 1


def test_ivar_routing_follows_the_programmed_bytes() -> None:
    unit, _, sent = make_unit()
    unit.write_eims(0x7)
    unit.write_ivar0(0x8180)  # RX0 -> vector 0, TX0 -> vector 1
    unit.write_ivar_misc(0x80)  # other -> vector 0
    unit.raise_tx()
    unit.raise_rx()
    unit.raise_misc()
    assert sent == [1, 0, 0]


def test_entries_without_valid_bit_raise_nothing() -> None:
    unit, _, sent = make_unit()
    unit.write_eims(0x7)
    unit.write_ivar0(0x0101)
    unit.write_ivar_misc(0x02)
    unit.raise_tx()
    unit.raise_rx()
    unit.raise_misc()
    assert sent == []
    assert unit.eicr == 0


def test_ivar_vector_bit() -> None:
    assert ivar_vector_bit(0x82) == 0x4
    assert ivar_vector_bit(0x81) == 0x2
    assert ivar_vector_bit(0x02) == 0
    assert ivar_vector_bit(0x83) == 0  # vector 3 does not exist on the VF


# -- auto-mask and auto-clear -------------------------------------------------------------------


def test_eiam_auto_masks_until_the_driver_rearms() -> None:
    unit, _, sent = make_unit()
    igbvf_open(unit)
    unit.raise_rx()
    assert sent == [1]
    assert unit.read_eims() == 0x5  # vector 1 auto-masked
    unit.raise_rx()  # a second frame before NAPI completes
    unit.raise_rx()
    assert sent == [1]
    assert unit.eicr & 0x2  # but the cause is pending
    unit.write_eims(0x2)  # napi_complete -> igbvf re-arms
    assert sent == [1, 1]
    assert unit.read_eims() == 0x5


def test_eiac_auto_clears_the_cause_on_send() -> None:
    unit, _, sent = make_unit()
    igbvf_open(unit)
    unit.raise_tx()
    assert sent == [0]
    assert unit.eicr & 0x1 == 0
    unit.write_eims(0x1)  # re-arm with nothing pending: no message
    assert sent == [0]


def test_without_eiac_the_cause_survives_the_send() -> None:
    unit, _, sent = make_unit()
    igbvf_open(unit)
    unit.write_eiac(0x0)
    unit.raise_tx()
    assert unit.eicr & 0x1
    unit.write_eims(0x1)  # still pending: sent again
    assert sent == [0, 0]


def test_without_eiam_every_cause_sends() -> None:
    unit, _, sent = make_unit()
    igbvf_open(unit)
    unit.write_eiam(0x0)
    unit.raise_rx()
    unit.raise_rx()
    assert sent == [1, 1]
    assert unit.read_eims() == 0x7


# -- EITR throttling ------------------------------------------------------------------------------


def test_eitr_value_to_interval() -> None:
    unit, _, _ = make_unit()
    unit.write_eitr(1, 488)
    assert unit.interval(1) == pytest.approx(488 * 256e-9)
    assert unit.read_eitr(1) == 488
    unit.write_eitr(0, 0x8000_0003)  # only the interval field (bits 14:2) is kept
    assert unit.read_eitr(0) == 0
    assert EITR_UNIT_S == 256e-9


def test_eitr_holds_the_second_message_until_the_interval_elapses() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    unit.write_eitr(1, 488)  # ~124.9 us
    interval = 488 * 256e-9
    unit.raise_rx()
    assert sent == [1]
    loop.advance(10e-6)
    unit.write_eims(0x2)  # re-armed, nothing pending
    unit.raise_rx()  # too early
    assert sent == [1]
    assert loop.pending() == 1
    assert loop.timers[0][0] == pytest.approx(interval)
    loop.advance(interval - 10e-6 - 1e-6)
    assert sent == [1]
    loop.advance(2e-6)
    assert sent == [1, 1]
    assert unit.deferred[1] == 1
    assert unit.read_eims() & 0x2 == 0  # auto-mask applied on the deferred send too


def test_throttled_vector_collapses_causes_into_one_message() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    unit.write_eiam(0x0)
    unit.write_eitr(0, 980)
    unit.raise_tx()
    for _ in range(5):
        unit.raise_tx()
    assert sent == [0]
    assert loop.pending() == 1
    loop.advance(980 * 256e-9)
    assert sent == [0, 0]


def test_timer_sends_nothing_if_masked_meanwhile_and_eims_sends_at_once_later() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    unit.write_eiam(0x0)
    unit.write_eitr(1, 488)
    unit.raise_rx()
    unit.raise_rx()
    unit.write_eimc(0x2)  # driver disables the vector
    loop.advance(1e-3)
    assert sent == [1]
    assert unit.eicr & 0x2  # still pending (EIAC cleared it on the first send, then re-raised)
    unit.write_eims(0x2)  # interval long gone: immediate
    assert sent == [1, 1]
    assert loop.pending() == 0


def test_other_vectors_are_not_throttled_by_one_vectors_eitr() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    unit.write_eitr(1, 488)
    unit.raise_rx()
    unit.write_eims(0x2)
    unit.raise_rx()  # deferred
    unit.raise_tx()  # EITR0 = 0: immediate
    assert sent == [1, 0]
    loop.advance(1e-3)
    assert sent == [1, 0, 1]


def test_eitr_zero_never_arms_timers() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    for _ in range(100):
        unit.raise_rx()
        unit.write_eims(0x2)
    assert len(sent) == 100
    assert loop.timers == []


def test_reset_cancels_timers_and_clears_everything() -> None:
    unit, loop, sent = make_unit()
    igbvf_open(unit)
    unit.write_eitr(1, 488)
    unit.raise_rx()
    unit.write_eims(0x2)
    unit.raise_rx()
    handle = loop.timers[0][2]
    unit.reset()
    assert handle.cancelled
    assert (unit.eicr, unit.eims, unit.eiac, unit.eiam) == (0, 0, 0, 0)
    assert (unit.ivar0, unit.ivar_misc, unit.eitr) == (0, 0, [0, 0, 0])
    assert not unit.timer_armed(1)
    loop.advance(1.0)
    assert sent == [1]


# -- through BAR0 ----------------------------------------------------------------------------------


def make_core() -> tuple[VfCore, list[int], FakeTx]:
    loop = FakeLoop()
    sent: list[int] = []
    tx = FakeTx()
    core = VfCore(Pf(), 0, sent.append, loop, tx, FakeRx(), clock=lambda: loop.now)
    return core, sent, tx


def bar0_open(core: VfCore) -> None:
    core.write(r.IVAR0, 4, 0x8081)
    core.write(r.IVAR_MISC, 4, 0x82)
    core.read(r.EICR, 4)
    core.write(r.EIAC, 4, 0x7)
    core.write(r.EIAM, 4, 0x7)
    core.write(r.EIMS, 4, 0x7)


def test_bar0_interrupt_registers() -> None:
    core, sent, _ = make_core()
    bar0_open(core)
    assert core.read(r.EIMS, 4) == 0x7
    core.write(r.EIMC, 4, 0xFFFF_FFFF)
    assert core.read(r.EIMS, 4) == 0
    core.write(r.EICS, 4, 0x6)
    assert sent == []
    assert core.read(r.EICR, 4) == 0x6
    assert core.read(r.EICR, 4) == 0
    assert core.read(r.IVAR0, 4) == 0x8081
    assert core.read(r.IVAR_MISC, 4) == 0x82
    assert core.read(r.EIAM, 4) == 0x7  # stored as written, not inverted


def test_bar0_watchdog_eics_fires_rx_vector() -> None:
    core, sent, _ = make_core()
    bar0_open(core)
    core.write(r.EICS, 4, 0x2)
    assert sent == [1]
    core.write(r.EICS, 4, 0x2)  # auto-masked
    assert sent == [1]


def test_tx_doorbell_completion_raises_vector_0() -> None:
    core, sent, tx = make_core()
    bar0_open(core)
    tx.completions = 1
    core.write(r.TDT0, 4, 1)
    assert sent == [0]
    core.write(r.TDT0, 4, 2)  # auto-masked until the TX handler re-arms
    assert sent == [0]
    core.write(r.EIMS, 4, 0x1)
    assert sent == [0, 0]


def test_link_down_and_up_raise_vector_2() -> None:
    core, sent, _ = make_core()
    bar0_open(core)
    core.set_link(False)
    assert sent == [2]
    assert core.read(r.STATUS, 4) & r.STATUS_LU == 0
    core.write(r.EIMS, 4, 0x4)  # igbvf_msix_other re-arms
    core.set_link(True)
    assert sent == [2, 2]
    assert core.read(r.STATUS, 4) == 0x83


def test_link_down_while_masked_leaves_eicr_bit_2() -> None:
    core, sent, _ = make_core()
    core.write(r.IVAR_MISC, 4, 0x82)
    core.set_link(False)
    assert sent == []
    assert core.read(r.EICR, 4) == 0x4


def test_pf_link_change_reaches_the_vf() -> None:
    pf = Pf()
    loop = FakeLoop()
    sent: list[int] = []
    core = VfCore(pf, 0, sent.append, loop, FakeTx(), FakeRx(), clock=lambda: loop.now)
    bar0_open(core)
    pf.set_link(False)
    assert sent == [2]
    assert not core.link_up
    core.close()
    pf.set_link(True)
    assert core.link_up is False  # no longer listening

"""VfCore: queue doorbells and causes, resets, stats registers, and igbvf's whole sequences."""

from __future__ import annotations

from collections.abc import Callable

from nic_fakes import FakeLoop
from structlog.testing import capture_logs

from vmsi_server.nic import registers as r
from vmsi_server.nic.mailbox import MSG_ACK, SET_LPE, SET_MAC_ADDR, VF_RESET
from vmsi_server.nic.pf import Pf, VfPort
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.vf_core import VfCore

# -- fakes (unit-test only) -------------------------------------------------------------------
# (the timer loop is nic_fakes.FakeLoop, shared by the NIC tests)


class FakeTx:
    """Records doorbells; ``results`` are what successive doorbells return."""

    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0
        self.results: list[int] = []
        self.doorbell_tails: list[int] = []
        self.resets = 0

    def doorbell(self) -> int:
        self.doorbell_tails.append(self.tail)
        return self.results.pop(0) if self.results else 0

    def reset(self) -> None:
        self.resets += 1
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0


class FakeRx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0
        self.results: list[int] = []
        self.tails: list[int] = []
        self.resets = 0

    def tail_written(self) -> int:
        self.tails.append(self.tail)
        return self.results.pop(0) if self.results else 0

    def reset(self) -> None:
        self.resets += 1
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.srrctl = self.rxdctl = 0


class Rig:
    def __init__(
        self, pf: Pf | None = None, port_changed: Callable[[VfPort], None] | None = None
    ) -> None:
        self.loop = FakeLoop()
        self.sent: list[int] = []
        self.tx = FakeTx()
        self.rx = FakeRx()
        self.stats = VfStats()
        self.pf = pf or Pf()
        self.core = VfCore(
            self.pf,
            0,
            self.sent.append,
            self.loop,
            self.tx,
            self.rx,
            stats=self.stats,
            clock=lambda: self.loop.now,
            port_changed=port_changed,
        )

    def rd(self, offset: int) -> int:
        return self.core.read(offset, 4)

    def wr(self, offset: int, value: int) -> None:
        self.core.write(offset, 4, value)

    def mbx_send(self, words: list[int]) -> None:
        """Lock, flush, write, REQ (mbx.c), without the posted polling."""
        self.wr(r.V2PMAILBOX, r.V2P_VFU)
        assert self.rd(r.V2PMAILBOX) & r.V2P_VFU
        self.rd(r.V2PMAILBOX)
        for i, word in enumerate(words):
            self.wr(r.VMBMEM + 4 * i, word)
        self.wr(r.V2PMAILBOX, r.V2P_REQ)
        assert self.rd(r.V2PMAILBOX) & r.V2P_PFACK

    def igbvf_probe(self) -> None:
        """§9.1: irq_disable, CTRL.RST, reset poll, VF_RESET, SET_MAC_ADDR."""
        self.wr(r.EIMC, 0xFFFF_FFFF)
        self.wr(r.EIAC, 0)
        self.wr(r.CTRL, self.rd(r.CTRL) | r.CTRL_RST)
        assert self.rd(r.V2PMAILBOX) & r.V2P_RSTD
        assert not self.rd(r.V2PMAILBOX) & (r.V2P_RSTD | r.V2P_RSTI)
        self.mbx_send([VF_RESET])
        assert self.rd(r.VMBMEM) == VF_RESET | MSG_ACK
        self.wr(r.V2PMAILBOX, r.V2P_ACK)
        mac = self.pf.vf(0).mac
        self.mbx_send([SET_MAC_ADDR, int.from_bytes(mac[:4], "little"), mac[4] | mac[5] << 8])
        for offset in (r.VFGPRC, r.VFGPTC, r.VFGORC, r.VFGOTC, r.VFMPRC):
            self.rd(offset)

    def igbvf_open(self) -> None:
        """§9.2: rings, SET_LPE last, IVAR/EITR, EICR read, irq_enable."""
        self.wr(r.TDBAL0, 0x1234_5000)
        self.wr(r.TDBAH0, 0x1)
        self.wr(r.TDLEN0, 16384)
        self.wr(r.TDH0, 0)
        self.wr(r.TDT0, 0)
        self.wr(r.DCA_TXCTRL0, self.rd(r.DCA_TXCTRL0) & ~0x800)
        self.wr(r.TXDCTL0, 0)
        self.wr(r.TXDCTL0, r.XDCTL_ENABLE)
        self.wr(r.SRRCTL0, 0x8200_0002)
        self.wr(r.RXDCTL0, 0)
        self.wr(r.RDBAL0, 0x2345_6000)
        self.wr(r.RDBAH0, 0)
        self.wr(r.RDLEN0, 16384)
        self.wr(r.RDH0, 0)
        self.wr(r.RDT0, 0)
        self.wr(r.RXDCTL0, 0x0201_0810)
        self.mbx_send([SET_LPE, 1522])
        self.wr(r.RDT0, 1023)
        self.wr(r.IVAR0, (self.rd(r.IVAR0) & 0xFFFF_00FF) | 0x8000)
        self.wr(r.IVAR0, (self.rd(r.IVAR0) & 0xFFFF_FF00) | 0x81)
        self.wr(r.EITR0, 488)
        self.wr(r.EITR1, 488)
        self.wr(r.IVAR_MISC, 0x82)
        self.rd(r.STATUS)
        self.rd(r.EICR)
        self.wr(r.EIAC, 0x7)
        self.wr(r.EIAM, 0x7)
        self.wr(r.EIMS, 0x7)

    def link_check(self) -> bool:
        """e1000_check_for_link_vf with get_link_status set."""
        if not self.rd(r.STATUS) & r.STATUS_LU:
            return False
        self.wr(r.V2PMAILBOX, r.V2P_VFU)
        assert self.rd(r.V2PMAILBOX) & r.V2P_VFU
        word0 = self.rd(r.VMBMEM)
        self.wr(r.V2PMAILBOX, r.V2P_ACK)
        return bool(word0 & 0x2000_0000)


# -- doorbells and causes -----------------------------------------------------------------------


def test_tdt_write_stores_tail_then_rings_the_doorbell() -> None:
    rig = Rig()
    rig.igbvf_open()
    rig.tx.results = [1]
    rig.wr(r.TDT0, 5)
    assert rig.tx.doorbell_tails[-1] == 5
    assert rig.rd(r.TDT0) == 5
    assert rig.sent == [0]


def test_tdt_without_completions_raises_nothing() -> None:
    rig = Rig()
    rig.igbvf_open()
    rig.tx.results = [0]
    rig.wr(r.TDT0, 1)
    assert rig.sent == []
    assert rig.core.interrupts.eicr == 0


def test_tdt_keeps_sixteen_bits() -> None:
    rig = Rig()
    rig.wr(r.TDT0, 0x1_0003)
    assert rig.tx.tail == 3


def test_rdt_write_calls_tail_written_and_delivered_frames_raise_rx() -> None:
    rig = Rig()
    rig.igbvf_open()
    rig.rx.results = [2]
    rig.wr(r.RDT0, 16)
    assert rig.rx.tails[-1] == 16
    assert rig.sent == [1]


def test_async_rx_delivery_raises_rx_cause_only_for_frames() -> None:
    rig = Rig()
    rig.igbvf_open()
    rig.core.rx_delivered(0)
    assert rig.sent == []
    rig.core.rx_delivered(3)
    assert rig.sent == [1]
    rig.core.tx_completed(1)
    assert rig.sent == [1, 0]


def test_ring_registers_live_on_the_queue_objects() -> None:
    rig = Rig()
    rig.igbvf_open()
    assert (rig.tx.bal, rig.tx.bah, rig.tx.len) == (0x1234_5000, 0x1, 16384)
    assert (rig.rx.bal, rig.rx.bah, rig.rx.len) == (0x2345_6000, 0, 16384)
    assert rig.rx.srrctl == 0x8200_0002
    assert rig.rx.rxdctl == 0x0201_0810
    assert rig.tx.txdctl == r.XDCTL_ENABLE
    rig.rx.head = 7  # the device advanced RDH
    assert rig.rd(r.RDH0) == 7
    rig.tx.head = 9
    assert rig.rd(r.TDH0) == 9


def test_swflsh_is_self_clearing() -> None:
    rig = Rig()
    rig.wr(r.TXDCTL0, r.XDCTL_ENABLE | r.XDCTL_SWFLSH)
    assert rig.rd(r.TXDCTL0) == r.XDCTL_ENABLE


def test_enabling_a_queue_with_work_pending_starts_it() -> None:
    rig = Rig()
    rig.wr(r.TDT0, 4)  # written while disabled: the queue ignores it
    rig.tx.results = [0, 1]
    assert rig.tx.doorbell_tails == [4]
    rig.wr(r.TXDCTL0, r.XDCTL_ENABLE)
    assert rig.tx.doorbell_tails == [4, 4]
    rig.wr(r.TXDCTL0, r.XDCTL_ENABLE)  # already enabled: no extra doorbell
    assert rig.tx.doorbell_tails == [4, 4]
    rig.rx.tail = 8
    rig.wr(r.RXDCTL0, 0x0201_0810)
    assert rig.rx.tails == [8]


# -- resets ---------------------------------------------------------------------------------------


def test_ctrl_rst_returns_queues_and_interrupts_to_power_on() -> None:
    rig = Rig()
    rig.igbvf_probe()
    rig.igbvf_open()
    tx_resets, rx_resets = rig.tx.resets, rig.rx.resets
    rig.wr(r.EITR1, 488)
    rig.core.rx_delivered(1)
    rig.wr(r.EIMS, 0x2)
    rig.core.rx_delivered(1)  # throttled: a timer is armed
    timer = rig.loop.timers[-1][2]
    rig.wr(r.CTRL, r.CTRL_RST)
    assert (rig.tx.resets, rig.rx.resets) == (tx_resets + 1, rx_resets + 1)
    assert timer.cancelled
    for offset in (r.EIMS, r.EIAC, r.EIAM, r.EICR, r.IVAR0, r.IVAR_MISC, r.EITR1):
        assert rig.rd(offset) == 0, hex(offset)
    assert not rig.core.port.cts
    assert rig.rd(r.V2PMAILBOX) == r.V2P_RSTD
    assert rig.rd(r.V2PMAILBOX) == 0
    assert rig.rd(r.VMBMEM) == 0
    assert rig.rd(r.CTRL) == 0


def test_function_reset_also_restores_the_assigned_mac() -> None:
    rig = Rig()
    rig.igbvf_probe()
    rig.core.port.mac = bytes.fromhex("02aabbccddee")
    rig.core.reset()
    assert rig.core.port.mac == rig.pf.vf(0).assigned_mac
    assert rig.rd(r.V2PMAILBOX) == r.V2P_RSTD
    assert rig.core.resets == 1  # reset() is not counted as a CTRL.RST


def test_stats_survive_resets() -> None:
    rig = Rig()
    rig.stats.rx_packet(100)
    rig.wr(r.CTRL, r.CTRL_RST)
    rig.core.reset()
    assert rig.rd(r.VFGPRC) == 1
    assert rig.rd(r.VFGORC) == 100


# -- stats ----------------------------------------------------------------------------------------


def test_stats_registers_count_wrap_and_do_not_clear_on_read() -> None:
    rig = Rig()
    stats = rig.stats
    stats.rx_packet(1514, multicast=True)
    stats.rx_packet(60)
    stats.tx_packet(1000)
    stats.rx_packet(200, loopback=True)
    stats.tx_packet(300, loopback=True)
    assert rig.rd(r.VFGPRC) == 3
    assert rig.rd(r.VFGPRC) == 3  # not read-to-clear
    assert rig.rd(r.VFGORC) == 1514 + 60 + 200
    assert rig.rd(r.VFMPRC) == 1
    assert rig.rd(r.VFGPTC) == 2
    assert rig.rd(r.VFGOTC) == 1300
    assert (rig.rd(r.VFGPRLBC), rig.rd(r.VFGORLBC)) == (1, 200)
    assert (rig.rd(r.VFGPTLBC), rig.rd(r.VFGOTLBC)) == (1, 300)
    stats.gorc = 0xFFFF_FFF0
    stats.rx_packet(0x20)
    assert rig.rd(r.VFGORC) == 0x10
    assert stats.gorc == 0x1_0000_0010  # telemetry keeps the full total


def test_drop_counters_by_reason() -> None:
    stats = VfStats()
    stats.drop("too_long")
    stats.drop("too_long", 2)
    stats.drop("filtered")
    assert stats.drops == {"too_long": 3, "filtered": 1}
    snap = stats.snapshot()
    assert snap["drop.too_long"] == 3 and snap["gprc"] == 0


# -- whole sequences ------------------------------------------------------------------------------


def test_probe_open_link_up_then_traffic_with_auto_mask() -> None:
    rig = Rig()
    rig.igbvf_probe()
    rig.igbvf_open()
    assert rig.link_check()  # VMBMEM[0] has CTS after SET_LPE
    assert rig.core.port.max_frame == 1522
    assert rig.core.port.accepts(rig.pf.vf(0).mac)
    rig.sent.clear()
    # per-packet TX doorbells: one message, then auto-masked until the handler re-arms
    rig.tx.results = [1, 1, 1]
    rig.wr(r.TDT0, 1)
    rig.wr(r.TDT0, 2)
    assert rig.sent == [0]
    rig.loop.now += 1e-3
    rig.wr(r.EIMS, 0x1)
    assert rig.sent == [0, 0]
    # watchdog software interrupt on the RX vector
    rig.wr(r.EICS, 0x2)
    assert rig.sent == [0, 0, 1]


def test_close_sequence_leaves_a_quiet_device() -> None:
    rig = Rig()
    rig.igbvf_probe()
    rig.igbvf_open()
    rig.sent.clear()
    rig.wr(r.RXDCTL0, 0)
    rig.wr(r.TXDCTL0, 0)
    rig.rd(r.STATUS)
    rig.wr(r.EIMC, 0xFFFF_FFFF)
    rig.wr(r.EIAC, 0)
    rig.wr(r.CTRL, rig.rd(r.CTRL) | r.CTRL_RST)
    rig.core.rx_delivered(1)
    rig.core.set_link(False)
    assert rig.sent == []
    assert rig.rd(r.TDT0) == rig.rd(r.TDH0) == rig.rd(r.RDT0) == rig.rd(r.RDH0) == 0


def test_hot_path_writes_do_not_log() -> None:
    rig = Rig()
    rig.igbvf_probe()
    rig.igbvf_open()
    rig.tx.results = [1] * 10
    rig.rx.results = [1] * 10
    with capture_logs() as logs:
        for i in range(10):
            rig.wr(r.TDT0, i)
            rig.wr(r.RDT0, i)
            rig.wr(r.EIMS, 0x3)
    assert logs == []


def test_link_change_is_logged_and_status_follows() -> None:
    rig = Rig()
    with capture_logs() as logs:
        rig.core.set_link(False)
        rig.core.set_link(False)  # no change, no event
    assert [e["event"] for e in logs] == ["nic.link.change"]
    assert rig.rd(r.STATUS) == 0x81


def test_port_changed_lets_the_rx_queue_follow_set_lpe() -> None:
    limits: list[int] = []
    rig = Rig(port_changed=lambda port: limits.append(port.max_frame))
    assert limits == [1522]  # power-on reset
    rig.rd(r.V2PMAILBOX)
    rig.mbx_send([VF_RESET])
    rig.mbx_send([SET_LPE, 1018])
    assert limits[-1] == 1018
    rig.wr(r.CTRL, r.CTRL_RST)
    assert limits[-1] == 1522

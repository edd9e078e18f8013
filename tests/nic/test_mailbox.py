"""Mailbox and PF answers, driven the way igbvf's mbx.c/vf.c drive them (igbvf.md §4, §5, §9)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from nic_fakes import FakeLoop

from vmsi_server.nic import registers as r
from vmsi_server.nic.mailbox import (
    MSG_ACK,
    MSG_CTS,
    MSG_NACK,
    SET_LPE,
    SET_MAC_ADDR,
    SET_MULTICAST,
    SET_VLAN,
    VF_RESET,
    Mailbox,
)
from vmsi_server.nic.pf import (
    DEFAULT_MAX_FRAME,
    Pf,
    VfPolicy,
    format_mac,
    multicast_hash,
    parse_mac,
)
from vmsi_server.nic.vf_core import VfCore

MAC = bytes.fromhex("025653000000")

# -- fakes (unit-test only) -------------------------------------------------------------------
# (the timer loop is nic_fakes.FakeLoop, shared by the NIC tests)


class FakeTx:
    def __init__(self) -> None:
        self.bal = self.bah = self.len = self.head = self.tail = 0
        self.txdctl = self.dca_txctrl = 0

    def doorbell(self) -> int:
        return 0

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


class IgbvfMbx:
    """A transcription of igbvf's mailbox code (mbx.c, vf.c) over BAR0, for tests only."""

    def __init__(self, core: VfCore) -> None:
        self.core = core
        self.cache = 0  # hw->dev_spec.vf.v2p_mailbox
        self.timeout = 0  # mbx->timeout: 0 until the first reset succeeds
        self.get_link_status = True
        self.raw_v2p: list[int] = []
        self.polls: list[int] = []  # V2PMAILBOX looks per posted poll

    def rd(self, offset: int) -> int:
        return self.core.read(offset, 4)

    def wr(self, offset: int, value: int) -> None:
        self.core.write(offset, 4, value)

    # e1000_read_v2p_mailbox / e1000_check_for_bit_vf
    def read_v2p(self) -> int:
        raw = self.rd(r.V2PMAILBOX)
        self.raw_v2p.append(raw)
        value = raw | self.cache
        self.cache |= value & r.V2P_READ_CLEAR
        return value

    def check_for_bit(self, mask: int) -> bool:
        found = bool(self.read_v2p() & mask)
        self.cache &= ~mask
        return found

    def obtain_lock(self) -> bool:
        for _ in range(11):
            self.wr(r.V2PMAILBOX, r.V2P_VFU)
            if self.read_v2p() & r.V2P_VFU:
                return True
        return False

    def write_mbx(self, msg: list[int]) -> bool:
        if not self.obtain_lock():
            return False
        self.check_for_bit(r.V2P_PFACK)  # flush stale ack
        self.check_for_bit(r.V2P_PFSTS)  # flush stale msg
        for i, word in enumerate(msg):
            self.wr(r.VMBMEM + 4 * i, word)
        self.wr(r.V2PMAILBOX, r.V2P_REQ)
        return True

    def read_mbx(self, size: int) -> list[int] | None:
        if not self.obtain_lock():
            return None
        msg = [self.rd(r.VMBMEM + 4 * i) for i in range(size)]
        self.wr(r.V2PMAILBOX, r.V2P_ACK)
        return msg

    def _poll(self, mask: int) -> bool:
        countdown = self.timeout
        if not countdown:
            return False
        self.polls.append(0)
        while countdown:
            self.polls[-1] += 1
            if self.check_for_bit(mask):
                return True
            countdown -= 1
        self.timeout = 0
        return False

    def write_posted(self, msg: list[int]) -> bool:
        if not self.timeout:
            return False
        return self.write_mbx(msg) and self._poll(r.V2P_PFACK)

    def read_posted(self, size: int) -> list[int] | None:
        if not self._poll(r.V2P_PFSTS):
            return None
        return self.read_mbx(size)

    # e1000_reset_hw_vf
    def reset_hw(self) -> tuple[bool, bytes | None, int]:
        self.wr(r.CTRL, self.rd(r.CTRL) | r.CTRL_RST)
        timeout, seen = 200, 0
        while self.check_for_bit(r.V2P_RSTD | r.V2P_RSTI) and timeout:
            timeout -= 1
            seen += 1
        if not timeout:
            return False, None, seen
        self.timeout = 2000
        if not self.write_posted([VF_RESET]):
            return False, None, seen
        reply = self.read_posted(3)
        if reply is None:
            return False, None, seen
        if reply[0] == VF_RESET | MSG_ACK:
            mac = (reply[1].to_bytes(4, "little") + reply[2].to_bytes(4, "little"))[:6]
            return True, mac, seen
        if reply[0] == VF_RESET | MSG_NACK:
            return True, bytes(6), seen
        return False, None, seen

    # e1000_set_uc_addr_vf / e1000_rar_set_vf: posted write + posted 3-word read
    def set_mac(self, mac: bytes, sub: int = 0) -> list[int] | None:
        words = [SET_MAC_ADDR | sub, *_mac_words(mac)]
        if not self.write_posted(words):
            return None
        return self.read_posted(3)

    def set_vlan(self, vid: int, add: bool) -> list[int] | None:
        if not self.write_posted([SET_VLAN | ((1 << 16) if add else 0), vid]):
            return None
        return self.read_posted(2)

    def set_multicast(self, macs: list[bytes]) -> bool:
        msg = [0] * 16
        count = min(len(macs), 30)
        msg[0] = SET_MULTICAST | (count << 16)
        for i in range(count):
            msg[1 + i // 2] |= multicast_hash(macs[i]) << (16 * (i & 1))
        return self.write_posted(msg)  # never read back

    def set_lpe(self, size: int, read_reply: bool = False) -> bool:
        ok = self.write_posted([SET_LPE, size])
        if ok and read_reply:  # some kernels read one word back
            ok = self.read_posted(1) is not None
        return ok

    # e1000_check_for_link_vf
    def check_for_link(self) -> tuple[bool, bool]:
        """Returns (link_up, error)."""
        if self.check_for_bit(r.V2P_RSTD | r.V2P_RSTI) or not self.timeout:
            self.get_link_status = True
        if not self.get_link_status:
            return True, False
        if not self.rd(r.STATUS) & r.STATUS_LU:
            return False, False
        msg = self.read_mbx(1)
        if msg is None:
            return False, False
        if not msg[0] & MSG_CTS:
            return False, bool(msg[0] & MSG_NACK)
        if not self.timeout:
            return False, True
        self.get_link_status = False
        return True, False


def _mac_words(mac: bytes) -> list[int]:
    padded = mac + bytes(2)
    return [int.from_bytes(padded[0:4], "little"), int.from_bytes(padded[4:8], "little")]


def make(
    pf: Pf | None = None, mailbox_interrupts: bool = True
) -> tuple[VfCore, IgbvfMbx, list[int]]:
    sent: list[int] = []
    core = VfCore(
        pf or Pf(),
        0,
        sent.append,
        FakeLoop(),
        FakeTx(),
        FakeRx(),
        clock=lambda: 0.0,
        mailbox_interrupts=mailbox_interrupts,
    )
    return core, IgbvfMbx(core), sent


def probed(pf: Pf | None = None) -> tuple[VfCore, IgbvfMbx, list[int]]:
    core, vf, sent = make(pf)
    ok, _, _ = vf.reset_hw()
    assert ok
    return core, vf, sent


# -- reset handshake ----------------------------------------------------------------------------


def test_probe_reset_handshake_returns_assigned_mac_and_enters_cts() -> None:
    core, vf, _ = make()
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_RSTD  # power-on: reset done, once
    ok, mac, seen = vf.reset_hw()
    assert ok
    assert mac == MAC
    assert seen == 1  # RSTD on the first poll, gone on the second
    assert vf.polls == [1, 1]  # PFACK on the first poll; PFSTS already cached by then
    assert core.port.cts
    assert core.mailbox.read_word(0) == 0x8000_0001  # exactly, no CTS


def test_reset_reply_words_are_mac_in_memory_order() -> None:
    pf = Pf(macs=[bytes.fromhex("0a1b2c3d4e5f")])
    core, vf, _ = make(pf)
    vf.reset_hw()
    assert [core.mailbox.read_word(i) for i in range(3)] == [0x8000_0001, 0x3D2C1B0A, 0x5F4E]


def test_rsti_never_set_and_rstd_seen_once_per_reset() -> None:
    core, vf, _ = make()
    vf.reset_hw()
    vf.reset_hw()
    for _ in range(5):
        vf.read_v2p()
    assert not any(raw & r.V2P_RSTI for raw in vf.raw_v2p)
    assert sum(1 for raw in vf.raw_v2p if raw & r.V2P_RSTD) == 2
    assert core.resets == 2


def test_ctrl_rst_drops_cts_and_clears_the_buffer() -> None:
    core, vf, _ = probed()
    assert vf.set_mac(MAC) is not None
    core.write(r.CTRL, 4, r.CTRL_RST)
    assert not core.port.cts
    assert core.mailbox.read_word(0) == 0
    # without a new VF_RESET every request is NACKed without CTS
    assert vf.write_mbx([SET_MAC_ADDR, *_mac_words(MAC)])
    assert core.mailbox.read_word(0) == SET_MAC_ADDR | MSG_NACK


def test_no_mac_assigned_nacks_reset_and_takes_the_drivers_random_mac() -> None:
    pf = Pf(macs=[None])
    core, vf, _ = make(pf)
    ok, mac, _ = vf.reset_hw()
    assert ok and mac == bytes(6)
    assert core.mailbox.read_word(0) == 0x4000_0001
    random_mac = bytes.fromhex("0e0000abcdef")
    reply = vf.set_mac(random_mac)
    assert reply is not None and reply[0] == 0xA000_0002
    assert core.port.mac == random_mac


# -- requests after reset -----------------------------------------------------------------------


def test_set_mac_addr_acked_with_cts_and_recorded() -> None:
    core, vf, _ = probed()
    new = bytes.fromhex("02aabbccddee")
    reply = vf.set_mac(new)
    assert reply is not None
    assert reply[0] == 0xA000_0002
    assert core.port.mac == new
    assert core.port.accepts(new) and not core.port.accepts(MAC)


def test_set_mac_addr_refused_by_policy() -> None:
    core, vf, _ = probed(Pf(policy=VfPolicy(allow_mac_change=False)))
    reply = vf.set_mac(bytes.fromhex("02aabbccddee"))
    assert reply is not None and reply[0] == SET_MAC_ADDR | MSG_CTS | MSG_NACK
    assert core.port.mac == MAC
    same = vf.set_mac(MAC)  # init_hw re-sends the permanent MAC: fine
    assert same is not None and same[0] == 0xA000_0002


@pytest.mark.parametrize("bad", ["01005e000001", "000000000000"])
def test_set_mac_addr_rejects_multicast_and_zero(bad: str) -> None:
    core, vf, _ = probed()
    reply = vf.set_mac(bytes.fromhex(bad))
    assert reply is not None and reply[0] & MSG_NACK
    assert core.port.mac == MAC


def test_filter_clr_and_at_most_three_extra_addresses() -> None:
    core, vf, _ = probed()
    clr = vf.set_mac(bytes(6), sub=0x1_0000)
    assert clr is not None and clr[0] == 0xA001_0002
    extras = [bytes.fromhex(f"02000000000{i}") for i in range(1, 5)]
    replies = [vf.set_mac(mac, sub=0x2_0000) for mac in extras]
    assert [rep[0] if rep else None for rep in replies] == [
        0xA002_0002,
        0xA002_0002,
        0xA002_0002,
        0x6002_0002,
    ]
    assert core.port.extra_macs == extras[:3]
    assert core.port.accepts(extras[0]) and not core.port.accepts(extras[3])
    vf.set_mac(bytes(6), sub=0x1_0000)
    assert core.port.extra_macs == []
    assert not core.port.accepts(extras[0])


def test_set_multicast_reply_has_cts_ack_although_never_read() -> None:
    core, vf, _ = probed()
    groups = [bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")]
    assert vf.set_multicast(groups)
    assert core.mailbox.read_word(0) == SET_MULTICAST | (2 << 16) | MSG_CTS | MSG_ACK
    assert core.port.mc_hashes == {multicast_hash(g) for g in groups}
    assert core.port.accepts(groups[0]) and core.port.accepts(groups[1])
    assert not core.port.accepts(bytes.fromhex("01005e7f0203"))
    assert core.port.accepts(b"\xff" * 6)


def test_set_multicast_keeps_at_most_thirty_hashes() -> None:
    core, vf, _ = probed()
    msg = [SET_MULTICAST | (40 << 16)] + [((2 * i + 1) << 16) | (2 * i) for i in range(15)]
    assert vf.write_posted(msg)
    assert core.port.mc_hashes == frozenset(range(30))


def test_set_vlan_add_and_remove() -> None:
    core, vf, _ = probed()
    add = vf.set_vlan(100, add=True)
    assert add is not None and add == [0xA001_0004, 100]
    assert core.port.vlans == {100}
    assert core.port.vlan_allowed(100) and not core.port.vlan_allowed(101)
    assert core.port.vlan_allowed(0)
    rem = vf.set_vlan(100, add=False)
    assert rem is not None and rem[0] == 0xA000_0004
    assert core.port.vlans == set()


def test_set_lpe_recorded_and_link_check_sees_cts() -> None:
    core, vf, _ = probed()
    vf.set_mac(MAC)
    assert vf.set_lpe(1522)  # last message before the link check, reply never read
    assert core.port.max_frame == 1522
    assert core.mailbox.read_word(0) == 0xA000_0005
    assert core.port.frame_fits(1522) and not core.port.frame_fits(1523)
    assert vf.check_for_link() == (True, False)


def test_set_lpe_value_changes_the_rx_limit_and_read_variant_works() -> None:
    core, vf, _ = probed()
    assert vf.set_lpe(1018, read_reply=True)
    assert core.port.max_frame == 1018
    assert vf.check_for_link() == (True, False)


def test_set_lpe_out_of_range_is_nacked() -> None:
    core, vf, _ = probed()
    assert vf.set_lpe(20000)
    assert core.mailbox.read_word(0) == SET_LPE | MSG_CTS | MSG_NACK
    assert core.port.max_frame == DEFAULT_MAX_FRAME


def test_unknown_message_is_nacked_with_cts() -> None:
    core, vf, _ = probed()
    assert vf.write_posted([0x0006, 1])  # SET_PROMISC: igbvf never sends it
    assert core.mailbox.read_word(0) == 0x0006 | MSG_CTS | MSG_NACK
    assert vf.write_posted([0x0123])
    assert core.mailbox.read_word(0) == 0x0123 | MSG_CTS | MSG_NACK
    assert core.port.nacks == 2


def test_before_reset_every_request_is_nacked_without_cts() -> None:
    core, vf, _ = make()
    vf.timeout = 2000  # pretend the reset poll passed, but never send VF_RESET
    for msg in ([SET_MAC_ADDR, *_mac_words(bytes.fromhex("02aabbccddee"))], [SET_LPE, 9000]):
        assert vf.write_posted(msg)
        assert core.mailbox.read_word(0) == msg[0] | MSG_NACK
    assert core.port.mac == MAC
    assert core.port.max_frame == DEFAULT_MAX_FRAME
    assert vf.check_for_link() == (False, True)  # NACK without CTS is an error


def test_word_already_carrying_ack_or_nack_is_not_a_request() -> None:
    core, vf, _ = probed()
    vf.set_lpe(1522)
    for word0 in (SET_LPE | MSG_ACK, SET_LPE | MSG_NACK):
        vf.write_mbx([word0, 4000])
        raw = core.read(r.V2PMAILBOX, 4)
        assert raw & r.V2P_PFACK and not raw & r.V2P_PFSTS
        assert core.mailbox.read_word(0) == word0  # untouched
    assert core.port.max_frame == 1522


# -- register-level semantics -------------------------------------------------------------------


def test_vfu_lock_semantics() -> None:
    core, _, _ = make()
    core.read(r.V2PMAILBOX, 4)  # consume RSTD
    core.write(r.V2PMAILBOX, 4, r.V2P_VFU)
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_VFU
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_VFU  # the lock is not read-to-clear
    assert not core.mailbox.pf_lock()  # PF cannot take it while the VF holds it
    core.write(r.V2PMAILBOX, 4, r.V2P_ACK)  # ACK drops VFU
    assert core.read(r.V2PMAILBOX, 4) == 0
    assert core.mailbox.pf_lock()
    core.write(r.V2PMAILBOX, 4, r.V2P_VFU)
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_PFU  # not granted while PFU held
    core.mailbox.pf_unlock()
    core.write(r.V2PMAILBOX, 4, r.V2P_VFU)
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_VFU


def test_req_drops_vfu_and_pfsts_pfack_clear_on_read() -> None:
    core, vf, _ = probed()
    vf.obtain_lock()
    core.write(r.VMBMEM, 4, SET_LPE)
    core.write(r.VMBMEM + 4, 4, 1522)
    core.write(r.V2PMAILBOX, 4, r.V2P_REQ)
    assert core.read(r.V2PMAILBOX, 4) == r.V2P_PFSTS | r.V2P_PFACK  # REQ not stored, VFU gone
    assert core.read(r.V2PMAILBOX, 4) == 0


def test_mailbox_reply_raises_the_other_vector() -> None:
    core, vf, sent = probed()
    core.write(r.IVAR_MISC, 4, 0x82)
    core.write(r.EIMS, 4, 0x4)
    vf.set_lpe(1522)
    assert sent == [2]


def test_mailbox_interrupts_can_be_turned_off() -> None:
    core, vf, sent = make(mailbox_interrupts=False)
    vf.reset_hw()
    core.write(r.IVAR_MISC, 4, 0x82)
    core.write(r.EIMS, 4, 0x4)
    vf.set_lpe(1522)
    assert sent == []


def test_mailbox_standalone_responder_contract() -> None:
    seen: list[tuple[int, ...]] = []

    def responder(words: Sequence[int]) -> list[int] | None:
        seen.append(tuple(words))
        return [0xA000_0005]

    events: list[bool] = []
    mbx = Mailbox(responder, lambda: events.append(True))
    mbx.write_word(0, SET_LPE)
    mbx.write_ctrl(r.V2P_REQ)
    assert seen[0][:2] == (SET_LPE, 0) and len(seen[0]) == 16
    assert mbx.read_word(0) == 0xA000_0005
    assert events == [True]
    assert mbx.requests == 1


# -- the PF object -------------------------------------------------------------------------------


def test_pf_assigns_stable_macs_from_a_locally_administered_base() -> None:
    pf = Pf(num_vfs=3)
    macs = [pf.vf(i).assigned_mac for i in range(3)]
    assert [format_mac(m) for m in macs] == [
        "02:56:53:00:00:00",
        "02:56:53:00:00:01",
        "02:56:53:00:00:02",
    ]
    assert all(m[0] & 0x02 and not m[0] & 0x01 for m in macs)
    assert Pf(num_vfs=3).vf(2).assigned_mac == macs[2]
    assert Pf(base_mac=parse_mac("02:00:00:00:00:10")).vf(0).mac == parse_mac("02:00:00:00:00:10")


def test_pf_rejects_unusable_mac_configuration() -> None:
    with pytest.raises(ValueError):
        Pf(base_mac=parse_mac("01:00:00:00:00:00"))
    with pytest.raises(ValueError):
        Pf(num_vfs=2, base_mac=parse_mac("02:00:00:00:00:ff"))
    with pytest.raises(ValueError):
        Pf(num_vfs=2, macs=[MAC])
    with pytest.raises(ValueError):
        parse_mac("02:00:00")


def test_function_reset_restores_assigned_mac_ctrl_rst_keeps_the_chosen_one() -> None:
    core, vf, _ = probed()
    chosen = bytes.fromhex("02aabbccddee")
    vf.set_mac(chosen)
    ok, mac, _ = vf.reset_hw()  # CTRL.RST + VF_RESET: Linux igb returns the current MAC
    assert ok and mac == chosen
    core.reset()
    assert core.port.mac == MAC
    assert not core.port.cts


def test_filter_is_closed_until_vf_reset() -> None:
    core, vf, _ = make()
    assert not core.port.accepts(MAC)
    assert not core.port.accepts(b"\xff" * 6)
    vf.reset_hw()
    assert core.port.accepts(MAC)
    assert core.port.accepts(memoryview(b"\xff" * 6 + b"payload"))
    assert not core.port.accepts(bytes.fromhex("02aabbccddee"))


def test_accept_all_multicast_policy() -> None:
    core, _, _ = probed(Pf(policy=VfPolicy(accept_all_multicast=True)))
    assert core.port.accepts(bytes.fromhex("01005e7f0203"))


def test_vf_reset_clears_filters() -> None:
    core, vf, _ = probed()
    vf.set_vlan(5, add=True)
    vf.set_multicast([bytes.fromhex("01005e000001")])
    vf.set_lpe(1018)
    vf.reset_hw()
    assert core.port.vlans == set()
    assert core.port.mc_hashes == frozenset()
    assert core.port.max_frame == DEFAULT_MAX_FRAME


def test_vf_reset_message_alone_clears_filters() -> None:
    core, vf, _ = probed()
    vf.set_vlan(5, add=True)
    vf.set_mac(bytes.fromhex("020000000001"), sub=0x2_0000)
    vf.set_lpe(1018)
    assert vf.write_posted([VF_RESET])  # no CTRL.RST this time
    assert core.port.vlans == set()
    assert core.port.extra_macs == []
    assert core.port.max_frame == DEFAULT_MAX_FRAME
    assert core.port.cts

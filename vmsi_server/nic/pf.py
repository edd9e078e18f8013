"""The physical function this server stands in for: VF MAC assignment, link, mailbox answers.

Why the server plays the PF: on real hardware (and in QEMU's igb model) a PF
driver in the host answers every VF mailbox message. Here the VF is the only
function exported, so the answers of Linux's igb PF (``igb_rcv_msg_from_vf``,
``igb_vf_reset_msg``) are reproduced as igbvf.md §4.3-4.5 specifies:

* VF_RESET -> ``[0x80000001, MAC 0-3, MAC 4-5]`` and the VF becomes "clear to
  send" (CTS); ``0x40000001`` when no MAC is assigned (the driver then picks a
  random one and sends SET_MAC_ADDR).
* Before a successful VF_RESET every other request gets ``msg|NACK`` without
  CTS. Afterwards every request gets ``msg|CTS|ACK`` (or ``|NACK``): the link
  check reads VMBMEM[0] directly and needs CTS there, even after SET_LPE or
  SET_MULTICAST whose replies igbvf never reads (the CTS|ACK trap, §4.5).
* A word 0 that already carries ACK or NACK is not a request and is ignored.

What the VF asks for is recorded on its ``VfPort`` so the RX path can filter:
the unicast MAC plus up to three extra addresses, the multicast hash list
(12-bit MTA indexes, as igbvf computes them), VLANs, and the SET_LPE maximum
frame size that protects the driver's 1522-byte buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from vmsi_server.nic.mailbox import (
    MAC_FILTER_ADD,
    MAC_FILTER_CLR,
    MSG_ACK,
    MSG_CTS,
    MSG_INFO_MASK,
    MSG_INFO_SHIFT,
    MSG_NACK,
    MSG_TYPE_MASK,
    SET_LPE,
    SET_MAC_ADDR,
    SET_MULTICAST,
    SET_VLAN,
    VF_RESET,
)

log = structlog.get_logger("vmsi.nic")

DEFAULT_BASE_MAC: Final = bytes.fromhex("025653000000")
"""Locally administered (bit 1 of byte 0), unicast; VF n gets last byte + n."""

BROADCAST: Final = b"\xff" * 6
ZERO_MAC: Final = bytes(6)
MAX_EXTRA_MACS: Final = 3
MAX_MULTICAST_HASHES: Final = 30
MAX_VLANS: Final = 32
"""The 82576's VLVF table size: more VLANs than that cannot be filtered per pool."""
DEFAULT_MAX_FRAME: Final = 1522
MIN_MAX_FRAME: Final = 68
MAX_MAX_FRAME: Final = 9728
"""igb's MAX_JUMBO_FRAME_SIZE; larger SET_LPE values are refused as igb does."""


def parse_mac(text: str) -> bytes:
    """ "02:56:53:00:00:01" (or with '-') -> 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def is_valid_unicast(mac: bytes) -> bool:
    """Linux's is_valid_ether_addr: not multicast, not all zeros."""
    return len(mac) == 6 and not mac[0] & 1 and mac != ZERO_MAC


def multicast_hash(mac: bytes) -> int:
    """The 12-bit MTA index igbvf sends for a group (``e1000_hash_mc_addr_vf``)."""
    return ((mac[4] >> 4) | (mac[5] << 4)) & 0xFFF


def _mac_from_words(words: Sequence[int]) -> bytes:
    """Words 1-2 of a message, in memory (little-endian) order."""
    return (words[1].to_bytes(4, "little") + words[2].to_bytes(4, "little"))[:6]


def _mac_to_words(mac: bytes) -> list[int]:
    return [int.from_bytes(mac[0:4], "little"), int.from_bytes(mac[4:6], "little")]


@dataclass(frozen=True, slots=True)
class VfPolicy:
    """What the PF lets a VF do.

    ``allow_mac_change`` mirrors Linux igb with no administrator-set MAC (the
    VF may choose its own); with it off, a SET_MAC_ADDR to a different address
    is NACKed and igbvf falls back to the permanent MAC. ``accept_all_multicast``
    skips the hash filter (a documented, acceptable simplification, §11).
    """

    allow_mac_change: bool = True
    accept_all_multicast: bool = False
    max_extra_macs: int = MAX_EXTRA_MACS


class VfPort:
    """The PF's view of one VF: its switch port (filters, frame limit) and mailbox state.

    The RX path keeps a reference to this object; resets mutate it in place.
    """

    def __init__(self, index: int, assigned_mac: bytes, policy: VfPolicy) -> None:
        self.index = index
        self.assigned_mac = assigned_mac
        """The stable MAC this VF gets at power-on and after a function reset."""
        self.policy = policy
        self.mac = assigned_mac
        self.extra_macs: list[bytes] = []
        self.mc_hashes: frozenset[int] = frozenset()
        self.vlans: set[int] = set()
        self.max_frame = DEFAULT_MAX_FRAME
        self.cts = False
        """Clear to send: set by VF_RESET; also gates RX/TX like the PF's VFRE/VFTE bits."""
        self.messages = 0
        self.nacks = 0

    # -- RX filter ------------------------------------------------------------------------
    def accepts(self, dst_mac: bytes | bytearray | memoryview) -> bool:
        """Would the PF's switch forward a frame with this destination to the VF?

        False until the VF completed VF_RESET (Linux sets VFRE only then).
        Unicast: the VF's MAC or one of its extra addresses. Broadcast: yes.
        Multicast: its 12-bit hash is in the VF's list (or accept-all policy).
        """
        if not self.cts:
            return False
        dst = bytes(dst_mac[:6])
        if dst[0] & 1:
            if dst == BROADCAST or self.policy.accept_all_multicast:
                return True
            return multicast_hash(dst) in self.mc_hashes
        return dst == self.mac or dst in self.extra_macs

    def vlan_allowed(self, vid: int) -> bool:
        """VLAN filter for tagged frames: VID 0 (priority tag) or a VID the VF added."""
        vid &= 0xFFF
        return vid == 0 or vid in self.vlans

    def frame_fits(self, length: int) -> bool:
        """SET_LPE limit: frames longer than it are dropped (igbvf.md §7.1)."""
        return length <= self.max_frame

    # -- resets ---------------------------------------------------------------------------
    def clear_filters(self) -> None:
        """What igb_vf_reset clears: extra MACs, multicast, VLANs; LPE back to default."""
        self.extra_macs.clear()
        self.mc_hashes = frozenset()
        self.vlans.clear()
        self.max_frame = DEFAULT_MAX_FRAME


Handler = Callable[[VfPort, int, Sequence[int]], bool]


class Pf:
    """The physical function: N VFs, their MACs and policies, the link, the mailbox answers."""

    def __init__(
        self,
        num_vfs: int = 1,
        *,
        base_mac: bytes = DEFAULT_BASE_MAC,
        macs: Sequence[bytes | None] | None = None,
        policy: VfPolicy | Sequence[VfPolicy] | None = None,
        link_up: bool = True,
    ) -> None:
        if num_vfs < 1:
            raise ValueError("a PF needs at least one VF")
        if policy is None:
            policy = VfPolicy()
        policies = [policy] * num_vfs if isinstance(policy, VfPolicy) else list(policy)
        if len(policies) != num_vfs:
            raise ValueError("one policy per VF")
        assigned = self._assign_macs(num_vfs, base_mac, macs)
        self._ports = [VfPort(i, assigned[i], policies[i]) for i in range(num_vfs)]
        self.link_up = link_up
        self._link_listeners: list[Callable[[bool], None]] = []
        self._handlers: dict[int, Handler] = {
            SET_MAC_ADDR: self._set_mac_addr,
            SET_MULTICAST: self._set_multicast,
            SET_VLAN: self._set_vlan,
            SET_LPE: self._set_lpe,
        }

    @staticmethod
    def _assign_macs(
        num_vfs: int, base_mac: bytes, macs: Sequence[bytes | None] | None
    ) -> list[bytes]:
        if macs is not None:
            if len(macs) != num_vfs:
                raise ValueError("one MAC (or None) per VF")
            out = [ZERO_MAC if mac is None else bytes(mac) for mac in macs]
        else:
            if not is_valid_unicast(base_mac) or base_mac[5] + num_vfs - 1 > 0xFF:
                raise ValueError(f"base MAC {format_mac(base_mac)} unusable for {num_vfs} VFs")
            out = [base_mac[:5] + bytes([base_mac[5] + i]) for i in range(num_vfs)]
        for mac in out:
            if mac != ZERO_MAC and not is_valid_unicast(mac):
                raise ValueError(f"VF MAC {format_mac(mac)} is not a unicast address")
        return out

    @property
    def num_vfs(self) -> int:
        return len(self._ports)

    def vf(self, index: int) -> VfPort:
        return self._ports[index]

    # -- link -----------------------------------------------------------------------------
    def add_link_listener(self, listener: Callable[[bool], None]) -> None:
        self._link_listeners.append(listener)

    def remove_link_listener(self, listener: Callable[[bool], None]) -> None:
        if listener in self._link_listeners:
            self._link_listeners.remove(listener)

    def set_link(self, up: bool) -> None:
        """The physical link changed: every VF sees it (STATUS.LU plus its "other" cause)."""
        if up == self.link_up:
            return
        self.link_up = up
        log.info("nic.pf.link", up=up)
        for listener in list(self._link_listeners):
            listener(up)

    # -- resets ---------------------------------------------------------------------------
    def vf_reset_event(self, index: int, *, function_reset: bool = False) -> None:
        """The VF reset itself (CTRL.RST) or was reset (FLR): it must send VF_RESET again.

        A function reset also forgets a MAC the VF chose, back to the assigned one.
        """
        port = self._ports[index]
        port.cts = False
        port.clear_filters()
        if function_reset:
            port.mac = port.assigned_mac

    # -- mailbox --------------------------------------------------------------------------
    def handle_message(self, index: int, words: Sequence[int]) -> list[int] | None:
        """Answer one VF request; returns the words to write from VMBMEM[0], or None."""
        port = self._ports[index]
        word0 = words[0]
        if word0 & (MSG_ACK | MSG_NACK):
            log.debug("nic.mailbox.ignored", vf=index, word0=f"{word0:#010x}")
            return None
        port.messages += 1
        msg = word0 & MSG_TYPE_MASK
        if msg == VF_RESET:
            return self._vf_reset(port)
        if not port.cts:
            port.nacks += 1
            log.info("nic.mailbox.not_cts", vf=index, word0=f"{word0:#010x}")
            return [word0 | MSG_NACK]
        handler = self._handlers.get(msg)
        ok = handler(port, word0, words) if handler is not None else False
        if not ok:
            port.nacks += 1
            log.info("nic.mailbox.nack", vf=index, word0=f"{word0:#010x}")
        return [word0 | MSG_CTS | (MSG_ACK if ok else MSG_NACK)]

    def _vf_reset(self, port: VfPort) -> list[int]:
        port.clear_filters()
        port.cts = True
        log.info("nic.mailbox.reset", vf=port.index, mac=format_mac(port.mac))
        if port.mac == ZERO_MAC:
            return [VF_RESET | MSG_NACK, 0, 0]
        return [VF_RESET | MSG_ACK, *_mac_to_words(port.mac)]

    @staticmethod
    def _set_mac_addr(port: VfPort, word0: int, words: Sequence[int]) -> bool:
        sub = word0 & MSG_INFO_MASK
        mac = _mac_from_words(words)
        if sub == MAC_FILTER_CLR:
            port.extra_macs.clear()
            return True
        if sub == MAC_FILTER_ADD:
            if not is_valid_unicast(mac):
                return False
            if mac not in port.extra_macs:
                if len(port.extra_macs) >= port.policy.max_extra_macs:
                    return False
                port.extra_macs.append(mac)
            return True
        if sub != 0 or not is_valid_unicast(mac):
            return False
        if mac != port.mac:
            if not port.policy.allow_mac_change and port.mac != ZERO_MAC:
                return False
            log.info("nic.mailbox.set_mac", vf=port.index, mac=format_mac(mac))
            port.mac = mac
        return True

    @staticmethod
    def _set_multicast(port: VfPort, word0: int, words: Sequence[int]) -> bool:
        count = min((word0 & MSG_INFO_MASK) >> MSG_INFO_SHIFT, MAX_MULTICAST_HASHES)
        count = min(count, 2 * (len(words) - 1))
        port.mc_hashes = frozenset(
            (words[1 + i // 2] >> (16 * (i & 1))) & 0xFFF for i in range(count)
        )
        log.debug("nic.mailbox.set_multicast", vf=port.index, count=count)
        return True

    @staticmethod
    def _set_vlan(port: VfPort, word0: int, words: Sequence[int]) -> bool:
        add = bool(word0 & MSG_INFO_MASK)
        vid = words[1] & 0xFFF
        if add:
            if vid not in port.vlans and len(port.vlans) >= MAX_VLANS:
                return False
            port.vlans.add(vid)
        else:
            port.vlans.discard(vid)
        log.debug("nic.mailbox.set_vlan", vf=port.index, vid=vid, add=add)
        return True

    @staticmethod
    def _set_lpe(port: VfPort, word0: int, words: Sequence[int]) -> bool:
        size = words[1]
        if not MIN_MAX_FRAME <= size <= MAX_MAX_FRAME:
            return False
        port.max_frame = size
        log.info("nic.mailbox.set_lpe", vf=port.index, max_frame=size)
        return True

"""The VF side of the PF/VF mailbox: V2PMAILBOX, VMBMEM[0..15], and the message word layout.

Why the PF answers inside the REQ write (igbvf.md §4.4): there is no guest PF
driver, and under vfio-user the REQ write arrives posted with the VF's next
V2PMAILBOX read served after it, so a synchronous answer makes PFACK visible
on the driver's first poll.

Register semantics, cross-checked with QEMU's ``igb_set_vfmailbox``:

* REQ and ACK are strobes: they act and are not stored (read as 0).
* VFU is the VF's lock: each write sets it if the written value has VFU and
  the PF does not hold PFU, and clears it otherwise (so ``REQ`` or ``ACK``
  alone releases the lock, as igbvf expects).
* PFSTS, PFACK and RSTD clear when read: the driver caches every read (§4.2).
* RSTI is never set: this PF is never in reset.

The message answering itself (what a VF_RESET returns, which requests get
NACKed) is the PF's policy and lives in ``pf.py``; this class only needs a
``responder`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import structlog

from vmsi_server.nic.registers import (
    U32,
    V2P_PFACK,
    V2P_PFSTS,
    V2P_PFU,
    V2P_READ_CLEAR,
    V2P_REQ,
    V2P_RSTD,
    V2P_VFU,
    VMBMEM_WORDS,
)

log = structlog.get_logger("vmsi.nic")

# -- message word 0 (mbx.h) ---------------------------------------------------------------
MSG_TYPE_MASK: Final = 0x0000_FFFF
MSG_INFO_SHIFT: Final = 16
MSG_INFO_MASK: Final = 0x00FF_0000
MSG_CTS: Final = 0x2000_0000
MSG_NACK: Final = 0x4000_0000
MSG_ACK: Final = 0x8000_0000

VF_RESET: Final = 0x01
SET_MAC_ADDR: Final = 0x02
SET_MULTICAST: Final = 0x03
SET_VLAN: Final = 0x04
SET_LPE: Final = 0x05
SET_PROMISC: Final = 0x06

MAC_FILTER_CLR: Final = 0x01 << MSG_INFO_SHIFT
MAC_FILTER_ADD: Final = 0x02 << MSG_INFO_SHIFT

Responder = Callable[[Sequence[int]], Sequence[int] | None]
"""Gets VMBMEM at the REQ; returns the reply words to write from word 0, or None to ignore."""


class Mailbox:
    """V2PMAILBOX and the 16-word buffer of one VF."""

    def __init__(self, responder: Responder, on_event: Callable[[], None] | None = None) -> None:
        self._responder = responder
        self._on_event = on_event
        self.mem: list[int] = [0] * VMBMEM_WORDS
        self.vfu = False
        self.pfu = False
        self.status = 0
        """PF-set bits still unread: PFSTS, PFACK, RSTD."""
        self.requests = 0
        self.ignored = 0
        self.reset()

    def reset(self) -> None:
        """After a VF reset: lock dropped, buffer cleared, RSTD up once (§3.1)."""
        self.mem[:] = [0] * VMBMEM_WORDS
        self.vfu = False
        self.pfu = False
        self.status = V2P_RSTD

    # -- V2PMAILBOX -----------------------------------------------------------------------
    def read_ctrl(self) -> int:
        value = self.status
        if self.vfu:
            value |= V2P_VFU
        if self.pfu:
            value |= V2P_PFU
        self.status &= ~V2P_READ_CLEAR
        return value

    def write_ctrl(self, value: int) -> None:
        self.vfu = bool(value & V2P_VFU) and not self.pfu
        if value & V2P_REQ:
            self._request()
        # ACK only tells the PF that its message was read: nothing here waits for it.

    # -- VMBMEM ---------------------------------------------------------------------------
    def read_word(self, index: int) -> int:
        return self.mem[index]

    def write_word(self, index: int, value: int) -> None:
        self.mem[index] = value & U32

    # -- PF side --------------------------------------------------------------------------
    def pf_lock(self) -> bool:
        """Take the buffer for the PF; fails while the VF holds VFU."""
        if self.vfu:
            return False
        self.pfu = True
        return True

    def pf_unlock(self) -> None:
        self.pfu = False

    def _request(self) -> None:
        self.requests += 1
        self.pfu = True
        try:
            reply = self._responder(tuple(self.mem))
        finally:
            self.pfu = False
        if reply is None:
            self.ignored += 1
            self.status |= V2P_PFACK
        else:
            words = [word & U32 for word in reply[:VMBMEM_WORDS]]
            self.mem[: len(words)] = words
            self.status |= V2P_PFACK | V2P_PFSTS
        if self._on_event is not None:
            self._on_event()

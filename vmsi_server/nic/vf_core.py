"""``VfCore``: the behaviour behind BAR0 of one 82576 Virtual Function.

It joins the register table (``registers.py``) to the objects that own the
state: the mailbox and the PF's answers, the interrupt unit, the statistics and
the TX/RX queue-0 rings written by the queue layer. PCI config space and the
MSI-X table are other layers; this class ends at ``deliver(vector)``.

Why the hot path looks the way it does: TDT (once per packet), RDT (every 16
RX buffers) and EIMS (once per interrupt) arrive as posted writes and are the
bulk of all register traffic (igbvf.md §9.5). Each costs one list index, one
bound-method call and the queue's own work; nothing on that path logs.

Resets (§3.1): CTRL.RST and ``reset()`` (DEVICE_RESET, FLR) both return the
queues, the interrupt unit and the mailbox to power-on state, drop the VF's
CTS state at the PF, keep RSTI clear and raise RSTD once (read-to-clear), so
the driver's reset poll sees it on its first read and not on its second.
``reset()`` also gives the VF back its assigned MAC. The statistics survive
both: igbvf computes deltas from a base it reads at probe.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

import structlog

from vmsi_server.nic import registers as r
from vmsi_server.nic.interrupts import Cancellable, InterruptUnit, TimerLoop
from vmsi_server.nic.mailbox import Mailbox
from vmsi_server.nic.pf import Pf, VfPort
from vmsi_server.nic.registers import BAR0_SIZE, BY_OFFSET, REGISTERS, U32, RegisterFile
from vmsi_server.nic.stats import COUNTER_BY_OFFSET, VfStats
from vmsi_server.pci.function import AccessError

log = structlog.get_logger("vmsi.nic")


class TxQueueLike(Protocol):
    """What ``vmsi_server.nic.tx.TxQueue`` offers the register file."""

    bal: int
    bah: int
    len: int
    head: int
    tail: int
    txdctl: int
    dca_txctrl: int

    def doorbell(self) -> int:
        """Process ``[head, tail)`` if enabled; returns completed RS descriptors."""
        ...

    def reset(self) -> None: ...


class RxQueueLike(Protocol):
    """What ``vmsi_server.nic.rx.RxQueue`` offers the register file."""

    bal: int
    bah: int
    len: int
    head: int
    tail: int
    srrctl: int
    rxdctl: int

    def tail_written(self) -> int:
        """New descriptors: deliver held frames; returns frames delivered."""
        ...

    def reset(self) -> None: ...


_STATUS_LINK_DOWN = r.STATUS_LINK_UP & ~r.STATUS_LU


class VfCore:
    """BAR0 of one VF: ``read``/``write`` dispatched by offset, resets, link, queue causes."""

    def __init__(
        self,
        pf: Pf,
        vf_index: int,
        deliver: Callable[[int], object],
        loop: TimerLoop,
        tx_queue: TxQueueLike,
        rx_queue: RxQueueLike,
        *,
        stats: VfStats | None = None,
        clock: Callable[[], float] = time.monotonic,
        mailbox_interrupts: bool = True,
        port_changed: Callable[[VfPort], None] | None = None,
        tx_resumed: Callable[[], None] | None = None,
    ) -> None:
        """Wire one VF to its PF, its MSI-X sender, the loop's timers and its queues.

        ``deliver(vector)`` sends an MSI-X message (the MSI-X layer masks and
        pends). ``stats`` is shared with the queues that count. ``clock`` must
        be the clock ``loop.call_later`` counts in. ``mailbox_interrupts``
        raises the "other" cause after each PF answer, like the hardware;
        igbvf only re-checks the link on it. ``port_changed(port)`` runs after
        each mailbox answer and each reset, so a queue keeping its own copy of
        the SET_LPE limit (``port.max_frame``) can follow it. ``tx_resumed()``
        runs after each continuation of a bounded TX walk (the queue's state
        changed outside a register write).
        """
        self.pf = pf
        self.vf_index = vf_index
        self.port: VfPort = pf.vf(vf_index)
        self.stats = stats if stats is not None else VfStats()
        self.tx = tx_queue
        self.rx = rx_queue
        self.interrupts = InterruptUnit(deliver, loop, clock=clock)
        self._loop = loop
        self._tx_resume: Cancellable | None = None
        self.stats.interrupts = self.interrupts
        self._mailbox_interrupts = mailbox_interrupts
        self._port_changed = port_changed
        self._tx_resumed = tx_resumed
        self.mailbox = Mailbox(partial(pf.handle_message, vf_index), self._mailbox_event)
        self.registers = RegisterFile(REGISTERS)
        self._readers = self.registers.readers
        self._writers = self.registers.writers
        self._link_up = pf.link_up
        self.resets = 0
        """CTRL.RST software resets seen (telemetry)."""
        self.invalid_accesses = 0
        self._bind()
        pf.add_link_listener(self.set_link)
        self._reset(function_reset=True)

    # -- BAR0 access ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3 or not 0 <= offset < BAR0_SIZE:
            raise self._invalid(offset, size, "read")
        return self._readers[offset >> 2]()

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3 or not 0 <= offset < BAR0_SIZE:
            raise self._invalid(offset, size, "write")
        self._writers[offset >> 2](value & U32)

    def _invalid(self, offset: int, size: int, op: str) -> AccessError:
        self.invalid_accesses += 1
        log.debug("nic.reg.bad_access", offset=f"{offset:#x}", size=size, op=op)
        return AccessError(
            errno.EINVAL, f"BAR0 {op} of {size} bytes at {offset:#x}: only aligned dwords"
        )

    # -- resets ---------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET / FLR: power-on state (§3.1), assigned MAC restored."""
        log.info("nic.vf.reset", vf=self.vf_index, cause="function")
        self._reset(function_reset=True)

    def _reset(self, *, function_reset: bool) -> None:
        self.tx.reset()
        self.rx.reset()
        self.interrupts.reset()
        self.mailbox.reset()
        self.registers.reset()
        self.pf.vf_reset_event(self.vf_index, function_reset=function_reset)
        if self._port_changed is not None:
            self._port_changed(self.port)

    def _mailbox_event(self) -> None:
        """The PF answered: the VF's filters or frame limit may have changed."""
        if self._port_changed is not None:
            self._port_changed(self.port)
        if self._mailbox_interrupts:
            self.interrupts.raise_misc()

    def _write_ctrl(self, value: int) -> None:
        if value & r.CTRL_RST:
            self.resets += 1
            log.info("nic.vf.reset", vf=self.vf_index, cause="ctrl.rst")
            self._reset(function_reset=False)
        self.registers.values[r.CTRL >> 2] = BY_OFFSET[r.CTRL].stored(value)

    def close(self) -> None:
        """The device goes away: no timers left, no more link callbacks."""
        if self._tx_resume is not None:
            self._tx_resume.cancel()
            self._tx_resume = None
        self.interrupts.reset()
        self.pf.remove_link_listener(self.set_link)

    # -- link -----------------------------------------------------------------------------
    @property
    def link_up(self) -> bool:
        return self._link_up

    def set_link(self, up: bool) -> None:
        """Change STATUS.LU and raise the "other" cause so igbvf re-checks (§5)."""
        if up == self._link_up:
            return
        self._link_up = up
        log.info("nic.link.change", vf=self.vf_index, up=up)
        self.interrupts.raise_misc()

    def _read_status(self) -> int:
        return r.STATUS_LINK_UP if self._link_up else _STATUS_LINK_DOWN

    # -- queue results --------------------------------------------------------------------
    def rx_delivered(self, count: int = 1) -> None:
        """The RX path wrote ``count`` frames outside a register write (tap readable)."""
        if count > 0:
            irq = self.interrupts
            irq.raise_cause(irq.rx_bits)

    def tx_completed(self, count: int = 1) -> None:
        """TX descriptors with RS completed outside a TDT write (deferred transmit)."""
        if count > 0:
            irq = self.interrupts
            irq.raise_cause(irq.tx_bits)

    def _write_tdt(self, value: int) -> None:
        tx = self.tx
        tx.tail = value & r.RING_INDEX_MASK
        if tx.doorbell() > 0:
            irq = self.interrupts
            irq.raise_cause(irq.tx_bits)
        if getattr(tx, "more", False) and self._tx_resume is None:
            self._tx_resume = self._loop.call_later(0.0, self._tx_continue)

    def _tx_continue(self) -> None:
        """The TX queue stopped at its per-call budget: go on, one budget per loop turn
        (sockets and the tap are served in between)."""
        self._tx_resume = None
        tx = self.tx
        self.tx_completed(tx.doorbell())
        if getattr(tx, "more", False):
            self._tx_resume = self._loop.call_later(0.0, self._tx_continue)
        if self._tx_resumed is not None:
            self._tx_resumed()

    def _write_rdt(self, value: int) -> None:
        rx = self.rx
        rx.tail = value & r.RING_INDEX_MASK
        if rx.tail_written() > 0:
            irq = self.interrupts
            irq.raise_cause(irq.rx_bits)

    def _write_txdctl(self, value: int) -> None:
        """Enabling a queue whose tail is ahead starts it, as the hardware's fetch would."""
        tx = self.tx
        was_enabled = tx.txdctl & r.XDCTL_ENABLE
        tx.txdctl = BY_OFFSET[r.TXDCTL0].stored(value)
        if not was_enabled and value & r.XDCTL_ENABLE and tx.tail != tx.head:
            self.tx_completed(tx.doorbell())
            if getattr(tx, "more", False) and self._tx_resume is None:
                self._tx_resume = self._loop.call_later(0.0, self._tx_continue)

    def _write_rxdctl(self, value: int) -> None:
        rx = self.rx
        was_enabled = rx.rxdctl & r.XDCTL_ENABLE
        rx.rxdctl = BY_OFFSET[r.RXDCTL0].stored(value)
        if not was_enabled and value & r.XDCTL_ENABLE and rx.tail != rx.head:
            self.rx_delivered(rx.tail_written())

    # -- table binding --------------------------------------------------------------------
    def _bind(self) -> None:
        bind = self.registers.bind
        irq = self.interrupts
        mbx = self.mailbox

        bind(r.CTRL, write=self._write_ctrl)
        bind(r.STATUS, read=self._read_status)
        for i in range(r.VMBMEM_WORDS):
            offset = r.VMBMEM + 4 * i
            bind(offset, read=partial(mbx.read_word, i), write=partial(mbx.write_word, i))
        bind(r.V2PMAILBOX, read=mbx.read_ctrl, write=mbx.write_ctrl)
        for offset, name in COUNTER_BY_OFFSET.items():
            bind(offset, read=partial(self.stats.read_register, name))

        bind(r.EICS, write=irq.write_eics)
        bind(r.EIMS, read=irq.read_eims, write=irq.write_eims)
        bind(r.EIMC, write=irq.write_eimc)
        bind(r.EIAC, read=irq.read_eiac, write=irq.write_eiac)
        bind(r.EIAM, read=irq.read_eiam, write=irq.write_eiam)
        bind(r.EICR, read=irq.read_eicr)
        for n in range(r.EITR_COUNT):
            offset = r.EITR0 + 4 * n
            bind(offset, read=partial(irq.read_eitr, n), write=partial(irq.write_eitr, n))
        bind(r.IVAR0, read=irq.read_ivar0, write=irq.write_ivar0)
        bind(r.IVAR_MISC, read=irq.read_ivar_misc, write=irq.write_ivar_misc)

        rx, tx = self.rx, self.tx
        self._bind_attr(r.RDBAL0, rx, "bal")
        self._bind_attr(r.RDBAH0, rx, "bah")
        self._bind_attr(r.RDLEN0, rx, "len")
        self._bind_attr(r.SRRCTL0, rx, "srrctl")
        self._bind_attr(r.RDH0, rx, "head")
        self._bind_attr(r.RDT0, rx, "tail")
        self._bind_attr(r.RXDCTL0, rx, "rxdctl")
        bind(r.RDT0, write=self._write_rdt)
        bind(r.RXDCTL0, write=self._write_rxdctl)

        self._bind_attr(r.TDBAL0, tx, "bal")
        self._bind_attr(r.TDBAH0, tx, "bah")
        self._bind_attr(r.TDLEN0, tx, "len")
        self._bind_attr(r.TDH0, tx, "head")
        self._bind_attr(r.TDT0, tx, "tail")
        self._bind_attr(r.DCA_TXCTRL0, tx, "dca_txctrl")
        self._bind_attr(r.TXDCTL0, tx, "txdctl")
        bind(r.TDT0, write=self._write_tdt)
        bind(r.TXDCTL0, write=self._write_txdctl)

    def _bind_attr(self, offset: int, obj: object, attr: str) -> None:
        """A ring register whose value lives on the queue object (configuration path only)."""
        stored = BY_OFFSET[offset].stored

        def read() -> int:
            return int(getattr(obj, attr)) & r.U32

        def write(value: int) -> None:
            setattr(obj, attr, stored(value))

        self.registers.bind(offset, read=read, write=write)

"""One simulated guest: a vfio-user connection to one VF, driven the way Linux drives it.

The guest is a table-forwarding client: every MSI-X table access its kernel
makes is sent to the server (as pre-2010 Xen forwarded them to qemu-dm), so
the server's fast path and slow path see what a 2010 device model saw.

* ``setup()`` is ``msix_capability_init`` plus igbvf's open: guest RAM as a
  memfd (DMA_MAP), bus mastering, MSI-X enable with the function masked, all
  entries masked, each entry's Vector Control read, address/data written,
  eventfds installed (SET_IRQS), the function mask cleared, each vector
  unmasked at ``request_irq``, then the NIC's interrupt registers (IVAR0,
  IVAR_MISC, EITR, EIAC/EIAM/EIMS = 0x7) and a STATUS flush read.
* ``raise_interrupt(v)`` is the traffic: an EICS write (igbvf's own software
  interrupt), so the VF's interrupt unit sends vector ``v`` through the MSI-X
  layer, which writes the guest's eventfd.
* ``handle(v, contended)`` is the interrupt handler: on contention the kernel's
  mask, flush read and unmask; then igbvf's EIMS re-arm.
* ``move_affinity(v)`` is x86's deferred affinity move.

Writes are posted (as QEMU sends BAR writes when no region is mmapped, and as
``writel`` is posted on PCI); reads are synchronous round trips, each timed.
"""

from __future__ import annotations

import os
import time

from vmsi_server.client.client import VfioUserClient, read_eventfd
from vmsi_server.msix.layout import ENTRY_SIZE, VECTOR_CONTROL_MASKBIT, EntryField
from vmsi_server.nic import registers as reg
from vmsi_server.pci.igbvf_layout import (
    IGBVF_MSIX_BAR,
    IGBVF_MSIX_OFFSET,
    IGBVF_MSIX_TABLE_OFFSET,
    IGBVF_MSIX_VECTORS,
    IGBVF_REGISTER_BAR,
)
from vmsi_server.protocol.constants import RegionIndex
from vmsi_server.replay.model import GuestKernel
from vmsi_server.replay.stats import ReplayStats

MSIX_CONTROL = IGBVF_MSIX_OFFSET + 2
MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY_MASTER = 0x0006

RAM_IOVA = 0x1_0000_0000
RAM_SIZE = 1 << 20

EITR_INITIAL = 488
"""igbvf's initial moderation: about 8000 interrupts/s per vector."""
IVAR0_IGBVF = 0x0000_8081  # RX queue 0 -> vector 1, TX queue 0 -> vector 0
IVAR_MISC_IGBVF = 0x82  # mailbox / other -> vector 2
ALL_VECTORS = 0x7

MSI_ADDRESS_BASE = 0xFEE0_0000
VCPUS = 4
"""Where affinity moves rotate a vector: the guest's vCPUs (APIC ids 0..3)."""


def _address(apic_id: int) -> int:
    return MSI_ADDRESS_BASE | (apic_id << 12)


def _data(vector: int, generation: int) -> int:
    """x86 MSI data: fixed delivery, edge, IDT vector (a new one after each move)."""
    return 0x30 + (vector * 16 + generation) % 0xC0


class SimulatedGuest:
    def __init__(
        self,
        index: int,
        socket_path: str,
        kernel: GuestKernel,
        stats: ReplayStats,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.index = index
        self.socket_path = socket_path
        self.kernel = kernel
        self.stats = stats
        self.client = VfioUserClient(socket_path, timeout=timeout)
        self.eventfds: list[int] = []
        self._apic = [index % VCPUS] * IGBVF_MSIX_VECTORS
        self._generation = [0] * IGBVF_MSIX_VECTORS
        self.closed = False

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.client
        c.device_info()
        c.map_ram(RAM_IOVA, RAM_SIZE)
        command = int.from_bytes(c.region_read(RegionIndex.CONFIG, PCI_COMMAND, 2), "little")
        self._config_write16(PCI_COMMAND, command | PCI_COMMAND_MEMORY_MASTER)
        # msix_capability_init: enable with the function masked, mask every entry.
        control = int.from_bytes(c.region_read(RegionIndex.CONFIG, MSIX_CONTROL, 2), "little")
        self._config_write16(MSIX_CONTROL, control | MSIX_ENABLE | MSIX_FUNCTION_MASK)
        for v in range(IGBVF_MSIX_VECTORS):
            self._table_write(v, EntryField.VECTOR_CONTROL, VECTOR_CONTROL_MASKBIT)
        for v in range(IGBVF_MSIX_VECTORS):  # msix_setup_msi_descs reads each control word
            self._table_read(v, EntryField.VECTOR_CONTROL, flush=False)
        for v in range(IGBVF_MSIX_VECTORS):
            self._write_message(v)
        self.eventfds = c.install_msix_eventfds(IGBVF_MSIX_VECTORS)
        self._config_write16(MSIX_CONTROL, (control | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK)
        # igbvf_configure_msix, then request_irq (which unmasks each vector).
        self._reg_write(reg.IVAR0, IVAR0_IGBVF)
        self._reg_write(reg.EITR0, EITR_INITIAL)
        self._reg_write(reg.EITR1, EITR_INITIAL)
        self._reg_write(reg.IVAR_MISC, IVAR_MISC_IGBVF)
        c.read32(IGBVF_REGISTER_BAR, reg.STATUS)
        for v in range(IGBVF_MSIX_VECTORS):
            self._unmask(v)
        # igbvf_irq_enable after an EICR read.
        c.read32(IGBVF_REGISTER_BAR, reg.EICR)
        self._reg_write(reg.EIAC, ALL_VECTORS)
        self._reg_write(reg.EIAM, ALL_VECTORS)
        self._reg_write(reg.EIMS, ALL_VECTORS)
        c.read32(IGBVF_REGISTER_BAR, reg.STATUS)  # every posted write above has landed
        for fd in self.eventfds:  # setup may have raised "other" (nothing does today)
            read_eventfd(fd)

    # -- traffic and interrupts -------------------------------------------------------------
    def raise_interrupt(self, vector: int) -> None:
        """The device has something for ``vector``: a software-triggered cause (EICS)."""
        self._reg_write(reg.EICS, 1 << vector)
        self.stats.raised += 1

    def handle(self, vector: int, contended: bool) -> bool:
        """The eventfd of ``vector`` is readable: run the handler. False on a spurious wake."""
        count = read_eventfd(self.eventfds[vector])
        if not count:
            return False
        stats = self.stats
        stats.handled += 1
        stats.signals += count
        if contended:
            # handle_edge_irq on a second CPU: mask (with its flush) and set PENDING;
            # the CPU in the handler unmasks and runs it again.
            stats.contended += 1
            self._mask(vector)
            self._unmask(vector)
        self._reg_write(reg.EIMS, 1 << vector)  # igbvf re-arms (EIAM auto-masked it)
        return True

    def move_affinity(self, vector: int) -> None:
        """x86 moves an MSI at its next interrupt: mask, new message, unmask."""
        self.stats.affinity_moves += 1
        self._mask(vector)
        if self.kernel.reads_message_on_move:  # 2.6.x read_msi_msg before the rewrite
            for f in (EntryField.ADDRESS_LO, EntryField.ADDRESS_HI, EntryField.DATA):
                self._table_read(vector, f, flush=False)
        self._apic[vector] = (self._apic[vector] + 1) % VCPUS
        self._generation[vector] += 1
        self._write_message(vector)
        self._unmask(vector)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.client.close()

    # -- the kernel's MSI-X primitives ------------------------------------------------------
    def _mask(self, vector: int) -> None:
        """pci_msix_mask: write the mask bit, read the start of the table to flush."""
        self._table_write(vector, EntryField.VECTOR_CONTROL, VECTOR_CONTROL_MASKBIT)
        self._table_read(0, EntryField.ADDRESS_LO, flush=True)

    def _unmask(self, vector: int) -> None:
        self._table_write(vector, EntryField.VECTOR_CONTROL, 0)
        if self.kernel.flush_on_unmask:
            self._table_read(0, EntryField.ADDRESS_LO, flush=True)

    def _write_message(self, vector: int) -> None:
        """Address and data of a masked entry (pci_write_msg_msix / write_msi_msg)."""
        self._table_write(vector, EntryField.ADDRESS_LO, _address(self._apic[vector]))
        self._table_write(vector, EntryField.ADDRESS_HI, 0)
        self._table_write(vector, EntryField.DATA, _data(vector, self._generation[vector]))
        if self.kernel.flushes_message_write:
            self._table_read(vector, EntryField.DATA, flush=True)

    # -- accesses ---------------------------------------------------------------------------
    def _table_write(self, vector: int, f: EntryField, value: int) -> None:
        offset = IGBVF_MSIX_TABLE_OFFSET + vector * ENTRY_SIZE + 4 * f
        self.client.write32(IGBVF_MSIX_BAR, offset, value, posted=True)
        self.stats.table_writes += 1

    def _table_read(self, vector: int, f: EntryField, *, flush: bool) -> int:
        offset = IGBVF_MSIX_TABLE_OFFSET + vector * ENTRY_SIZE + 4 * f
        t0 = time.perf_counter_ns()
        value = self.client.read32(IGBVF_MSIX_BAR, offset)
        self.stats.read_latency_ns.append(time.perf_counter_ns() - t0)
        self.stats.table_reads += 1
        if flush:
            self.stats.flush_reads += 1
        return value

    def _reg_write(self, offset: int, value: int) -> None:
        self.client.write32(IGBVF_REGISTER_BAR, offset, value, posted=True)
        self.stats.register_writes += 1

    def _config_write16(self, offset: int, value: int) -> None:
        self.client.region_write(RegionIndex.CONFIG, offset, (value & 0xFFFF).to_bytes(2, "little"))

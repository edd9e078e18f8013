"""The load model: how many guests, how often they are interrupted, how they mask.

A replay run is described by one ``LoadModel``. The guest-side MSI-X
behaviour follows the Linux kernel (reference/msix-in-qemu.md section 6 and
the 2.6.32 sources for the 2010 era), selected by ``GuestKernel``:

====================  =====================================  ==============================
step                  ``linux-6`` (5.14 and later)            ``linux-2.6`` (2010 era)
====================  =====================================  ==============================
mask a vector         write Vector Control = 1,               same
                      read table start (entry 0 address lo)
unmask a vector       write Vector Control = 0                write, then read table start
write a message       write address lo, hi, data;             write address lo, hi, data
                      read the entry's data back
affinity move         mask; write message; unmask             mask; read address lo, hi and
                      (x86 defers it to the next interrupt)   data (``read_msi_msg``); write
                                                              message; unmask
====================  =====================================  ==============================

Per interrupt (``handle_edge_irq``): with probability ``contention`` the
interrupt "hits contention" (it arrives on a CPU while another CPU is still in
its handler), so the kernel masks the vector (with its flush read) and the
handling CPU unmasks it afterwards; otherwise the table is not touched. The
driver then re-arms the vector (igbvf writes EIMS from its handler), which the
NIC's auto-mask (EIAM) requires before the vector can fire again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GuestKernel(enum.Enum):
    LINUX_6 = "linux-6"
    LINUX_2_6 = "linux-2.6"

    @property
    def flush_on_unmask(self) -> bool:
        """2.6.x ``msi_set_mask_bit`` flushed both directions; 5.x+ only the mask."""
        return self is GuestKernel.LINUX_2_6

    @property
    def reads_message_on_move(self) -> bool:
        """2.6.x ``set_msi_irq_affinity`` read the message back before rewriting it."""
        return self is GuestKernel.LINUX_2_6

    @property
    def flushes_message_write(self) -> bool:
        """5.14+ ``pci_write_msg_msix`` reads the data DWORD back after the writes."""
        return self is GuestKernel.LINUX_6


@dataclass(frozen=True)
class LoadModel:
    """Parameters of one replay run (all rates per guest).

    The defaults are the seed scenario, scaled: 24 guests; every interrupt
    masks and unmasks (the "old guests mask and unmask on every interrupt" of
    QEMU's vfio code, the RHEL5-era igbvf guests of msix-in-qemu.md section 5;
    a modern kernel in steady state is near 0); irqbalance-like affinity moves;
    25 interrupts/s per guest, scaled down from the thousands a real VF sees to
    what a Python server serves on a small machine (compare per interrupt).
    """

    guests: int = 24
    rate: float = 25.0
    """Interrupts per second each guest's device raises (EICS writes)."""
    contention: float = 1.0
    """Share of interrupts that hit contention (mask, flush read, unmask)."""
    affinity_rate: float = 0.1
    """Affinity moves per second per guest (irqbalance runs every 10 s)."""
    duration: float = 10.0
    kernel: GuestKernel = GuestKernel.LINUX_6
    seed: int = 1
    workers: int = 2
    """Load-generator processes (the guests are split among them; at most one per
    guest). One process blocks on each synchronous table read, like one vCPU, and
    tops out near 1,300 interrupts/s at contention 1 on a 2-CPU machine; two
    reach 2,400/s."""
    vectors: tuple[int, ...] = (0, 1)
    """Vectors the traffic interrupts on: igbvf's TX (0) and RX (1)."""

    def __post_init__(self) -> None:
        if self.guests < 1:
            raise ValueError("at least one guest")
        if self.rate < 0 or self.affinity_rate < 0:
            raise ValueError("rates must not be negative")
        if not 0.0 <= self.contention <= 1.0:
            raise ValueError("contention is a share between 0 and 1")
        if self.duration <= 0:
            raise ValueError("duration must be positive")
        if self.workers < 1:
            raise ValueError("at least one load-generator process")
        if not self.vectors or any(not 0 <= v < 3 for v in self.vectors):
            raise ValueError("vectors are igbvf's 0 (TX), 1 (RX), 2 (other)")

    def table_accesses_per_second(self) -> tuple[float, float]:
        """Expected (table reads, table writes) per second and guest in steady state."""
        k = self.kernel
        mask_reads, mask_writes = 1 + int(k.flush_on_unmask), 2
        move_reads = 1 + int(k.flush_on_unmask) + 3 * int(k.reads_message_on_move) + int(
            k.flushes_message_write
        )
        move_writes = 2 + 3
        reads = self.rate * self.contention * mask_reads + self.affinity_rate * move_reads
        writes = self.rate * self.contention * mask_writes + self.affinity_rate * move_writes
        return reads, writes

    @property
    def processes(self) -> int:
        """Load-generator processes actually used (never more than guests)."""
        return min(self.workers, self.guests)


def socket_paths(template: str, guests: int, first: int = 0) -> list[str]:
    """One socket per guest from a ``{vf}`` template (as ``vmsi-server --vfs``)."""
    if "{vf}" not in template:
        if guests != 1:
            raise ValueError("--socket-path needs a {vf} template for more than one guest")
        return [template]
    return [template.replace("{vf}", str(first + i)) for i in range(guests)]

"""The VF's nine statistics counters, plus drop counters by reason for telemetry.

Why the registers never clear: igbvf reads the counters at probe to take a
base, then every 2 s, and computes deltas with 32-bit wrap handling
(``UPDATE_VF_COUNTER``). Clearing them on read or on a VF reset would make
the driver's totals jump. The counters are therefore kept here as unbounded
totals (handy for telemetry) and truncated to 32 bits only when the guest
reads the register, which also keeps the per-packet update to one addition.

Loopback (VF-to-VF through the PF's switch) frames count in both the general
and the loopback counters, as on the 82599 whose datasheet states it; the
backends here never produce loopback traffic unless a loop backend asks.
Octet counters add whatever length the caller passes (the frame as seen on the
tap, without FCS).
"""

from __future__ import annotations

from typing import Final, Protocol

from vmsi_server.nic.registers import (
    U32,
    VFGORC,
    VFGORLBC,
    VFGOTC,
    VFGOTLBC,
    VFGPRC,
    VFGPRLBC,
    VFGPTC,
    VFGPTLBC,
    VFMPRC,
)
from vmsi_server.telemetry.collectors import Collectors

COUNTER_BY_OFFSET: Final[dict[int, str]] = {
    VFGPRC: "gprc",
    VFGPTC: "gptc",
    VFGORC: "gorc",
    VFGOTC: "gotc",
    VFMPRC: "mprc",
    VFGPRLBC: "gprlbc",
    VFGPTLBC: "gptlbc",
    VFGORLBC: "gorlbc",
    VFGOTLBC: "gotlbc",
}
"""BAR0 offset -> ``VfStats`` attribute."""


class _InterruptCounts(Protocol):
    @property
    def sent(self) -> list[int]: ...
    @property
    def deferred(self) -> list[int]: ...


class VfStats(Collectors):
    """Counters the queues update and the register file reads (and, folded in by a
    collector before every read-out, what compiled code counted)."""

    __slots__ = (
        "_collectors",
        "drops",
        "gorc",
        "gorlbc",
        "gotc",
        "gotlbc",
        "gprc",
        "gprlbc",
        "gptc",
        "gptlbc",
        "interrupts",
        "mprc",
        "rx_csum_errors",
        "rx_csum_good",
        "rx_ring_full",
        "rx_wakeups",
        "tx_csum_frames",
        "tx_tso_frames",
        "tx_tso_segments",
    )

    def __init__(self) -> None:
        self._collectors = []
        self.gprc = 0
        self.gptc = 0
        self.gorc = 0
        self.gotc = 0
        self.mprc = 0
        self.gprlbc = 0
        self.gptlbc = 0
        self.gorlbc = 0
        self.gotlbc = 0
        self.tx_tso_frames = 0
        """TSO super-frames handed to the backend (one per TSE packet, however many
        segments it becomes on the wire)."""
        self.tx_tso_segments = 0
        """The wire frames those super-frames become (MSS-sized segments)."""
        self.tx_csum_frames = 0
        """Non-TSO frames sent with an offloaded L4 checksum (TXSM / legacy IC)."""
        self.rx_wakeups = 0
        """Times the backend was found readable (RX polls outside register writes)."""
        self.rx_csum_good = 0
        """Frames written back with a verified IP/TCP/UDP checksum (IPCS/TCPCS/UDPCS)."""
        self.rx_csum_errors = 0
        """Frames written back with a checksum error bit (IPE/TCPE)."""
        self.rx_ring_full = 0
        """Times RX stopped watching the backend because the ring had no free
        descriptor (frames then wait in the tap until the driver refills)."""
        self.interrupts: _InterruptCounts | None = None
        """The VF's interrupt unit, for its per-vector message counts in snapshots."""
        self.drops: dict[str, int] = {}
        """Frames not delivered, by reason ("too_long", "filtered", "no_descriptors", ...)."""

    def rx_packet(self, length: int, multicast: bool = False, loopback: bool = False) -> None:
        """A frame was written to the guest (broadcast counts as multicast, as in hardware)."""
        self.gprc += 1
        self.gorc += length
        if multicast:
            self.mprc += 1
        if loopback:
            self.gprlbc += 1
            self.gorlbc += length

    def rx_packets(self, count: int, octets: int, multicast: int = 0) -> None:
        """``count`` frames (``multicast`` of them multicast/broadcast) of ``octets``
        bytes in all were written to the guest: one update per RX batch."""
        self.gprc += count
        self.gorc += octets
        self.mprc += multicast

    def rx_checksums(self, good: int, errors: int) -> None:
        self.rx_csum_good += good
        self.rx_csum_errors += errors

    def tx_packet(self, length: int, loopback: bool = False) -> None:
        """A frame left for the backend (one per TSO segment if the caller segments)."""
        self.gptc += 1
        self.gotc += length
        if loopback:
            self.gptlbc += 1
            self.gotlbc += length

    def tx_packets(self, count: int, octets: int) -> None:
        """``count`` frames of ``octets`` bytes in all left at once (a TSO super-frame's
        segments): one update instead of one per segment."""
        self.gptc += count
        self.gotc += octets

    def tx_offloaded(self, tso_segments: int) -> None:
        """A frame with an offload left: a TSO super-frame of ``tso_segments`` segments,
        or (``tso_segments == 0``) a single frame with a checksum to finish."""
        if tso_segments:
            self.tx_tso_frames += 1
            self.tx_tso_segments += tso_segments
        else:
            self.tx_csum_frames += 1

    def tx_offloads(self, tso_frames: int, tso_segments: int, csum_frames: int) -> None:
        """Several offloaded frames at once (the compiled TX walk's totals)."""
        self.tx_tso_frames += tso_frames
        self.tx_tso_segments += tso_segments
        self.tx_csum_frames += csum_frames

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    def read_register(self, name: str) -> int:
        """The 32-bit register view of a counter: wraps, never clears."""
        self.collect()
        value: int = getattr(self, name)
        return value & U32

    def snapshot(self) -> dict[str, int]:
        """Full-width totals for telemetry."""
        self.collect()
        out = {name: int(getattr(self, name)) for name in COUNTER_BY_OFFSET.values()}
        out["tx_tso_frames"] = self.tx_tso_frames
        out["tx_tso_segments"] = self.tx_tso_segments
        out["tx_csum_frames"] = self.tx_csum_frames
        out["rx_wakeups"] = self.rx_wakeups
        out["rx_ring_full"] = self.rx_ring_full
        out["rx_csum_good"] = self.rx_csum_good
        out["rx_csum_errors"] = self.rx_csum_errors
        irq = self.interrupts
        if irq is not None:
            for v, (sent, deferred) in enumerate(zip(irq.sent, irq.deferred, strict=True)):
                out[f"irq.sent.{v}"] = sent
                out[f"irq.deferred.{v}"] = deferred
        out.update({f"drop.{reason}": n for reason, n in self.drops.items()})
        return out

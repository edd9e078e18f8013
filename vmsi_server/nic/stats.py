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

from typing import Final

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


class VfStats:
    """Counters the queues update and the register file reads."""

    __slots__ = (
        "drops",
        "gorc",
        "gorlbc",
        "gotc",
        "gotlbc",
        "gprc",
        "gprlbc",
        "gptc",
        "gptlbc",
        "mprc",
    )

    def __init__(self) -> None:
        self.gprc = 0
        self.gptc = 0
        self.gorc = 0
        self.gotc = 0
        self.mprc = 0
        self.gprlbc = 0
        self.gptlbc = 0
        self.gorlbc = 0
        self.gotlbc = 0
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

    def tx_packet(self, length: int, loopback: bool = False) -> None:
        """A frame left for the backend (one per TSO segment if the caller segments)."""
        self.gptc += 1
        self.gotc += length
        if loopback:
            self.gptlbc += 1
            self.gotlbc += length

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    def read_register(self, name: str) -> int:
        """The 32-bit register view of a counter: wraps, never clears."""
        value: int = getattr(self, name)
        return value & U32

    def snapshot(self) -> dict[str, int]:
        """Full-width totals for telemetry."""
        out = {name: int(getattr(self, name)) for name in COUNTER_BY_OFFSET.values()}
        out.update({f"drop.{reason}": n for reason, n in self.drops.items()})
        return out

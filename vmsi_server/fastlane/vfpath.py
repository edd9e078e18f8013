"""Python side of one VF's compiled hot path (``vf.c``).

``VfPath`` owns the ``struct vl_vf`` a session's lane and the loop's poller
hand TDT/RDT/EIMS/EICS writes and tap wake-ups to. It points the struct at the
buffers the Python objects already keep their state in, so there is nothing to
copy back. What it must do is *publish*: after every change Python makes to
what decides whether C may serve a queue at all (ring registers, queue enable,
bus mastering, a walk only Python can continue, whether the tap is watched,
the guest's memory map), :meth:`VfPath.publish` recomputes ``tx_ready`` and
``rx_ready`` and the rings C walks. The MSI-X controller keeps its own gate
current (``MsixController.gate``). And it folds what C counted into
``VfStats`` and the backend's error counts, as deltas, before every read-out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from vmsi_server import fastlane
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.guestmap import GuestMap
from vmsi_server.fastlane.rxpath import DROP_REASONS, TapRx
from vmsi_server.fastlane.txpath import TapTx
from vmsi_server.msix.controller import MsixController
from vmsi_server.nic.interrupts import InterruptUnit
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import DOORBELL_BUDGET, TxQueue

log = structlog.get_logger("vmsi.fastlane.vf")

EV_TRY_SEND, EV_TRIGGER, EV_RX_FULL, EV_RX_DRAIN, EV_RX_ERRNO, EV_TX_ERRNO = range(6)
"""``enum vl_vf_event``."""

_TX_COUNTS = ("tx_frames", "tx_octets", "tx_tso_frames", "tx_tso_segments",
              "tx_csum_frames", "tx_eagain", "tx_enobufs")
_RX_COUNTS = ("rx_frames", "rx_octets", "rx_multicast", "rx_csum_good", "rx_csum_errors",
              "rx_short", "rx_wakeups")

_bound: tuple[Any, Any] | None = None


def _ffi_lib() -> tuple[Any, Any]:
    global _bound
    if _bound is None:
        mod = fastlane.module()
        ffi = mod.ffi

        @ffi.def_extern()  # type: ignore[untyped-decorator]
        def vl_vf_event(handle: Any, what: int, arg: int) -> int:
            try:
                path: VfPath = ffi.from_handle(handle)
                path.event(what, arg)
            except Exception:  # never unwind into C; the device logs its own failures
                log.exception("fastlane.vf_event_failed", what=what, arg=arg)
            return 0

        _bound = (ffi, mod.lib)
    return _bound


class VfPath:
    """One VF's ``struct vl_vf``: wiring, publishing, event handling, counters."""

    def __init__(self, *, bar: int, offsets: dict[str, int], interrupts: InterruptUnit,
                 msix: MsixController, tx: TxQueue, rx: RxQueue, stats: VfStats,
                 errors: Counter[str] | None, on_rx_full: Callable[[], None],
                 rx_batch: int) -> None:
        """``offsets``: the BAR offsets of ``tdt``, ``rdt``, ``eims`` and ``eics``.
        ``on_rx_full()``: the ring filled in C; the owner stops watching the tap."""
        ffi, lib = _ffi_lib()
        self._ffi, self._lib = ffi, lib
        self._interrupts, self._msix, self._tx, self._rx = interrupts, msix, tx, rx
        self._stats = stats
        self._errors = errors
        self._on_rx_full = on_rx_full
        c = ffi.new("struct vl_vf *")
        self._c = c
        self._handle = ffi.new_handle(self)
        c.handle = self._handle
        c.bar = bar
        c.tdt, c.rdt, c.eims, c.eics = (offsets[k] for k in ("tdt", "rdt", "eims", "eics"))
        c.native_clock = 1 if interrupts.native_clock else 0
        c.tx_budget = DOORBELL_BUDGET
        c.rx_batch = rx_batch
        self._pins = [ffi.from_buffer(b) for b in (
            interrupts.state, msix.gate, msix.forwarded_word, msix.table_dwords,
            tx.ring, rx.ring)]
        irq, gate, forwarded, dwords, tx_ring, rx_ring = self._pins
        c.irq = ffi.cast("int64_t *", irq)
        c.gate = ffi.cast("int64_t *", gate)
        c.forwarded = ffi.cast("const uint32_t *", forwarded)
        c.dwords = ffi.cast("const uint32_t *", dwords)
        c.tx_ring = ffi.cast("uint32_t *", tx_ring)
        c.rx_ring = ffi.cast("uint32_t *", rx_ring)
        tap_tx: TapTx | None = tx.fast
        tap_rx: TapRx | None = rx.fast
        c.tx = tap_tx.cdata if tap_tx is not None else ffi.NULL
        c.rx = tap_rx.cdata if tap_rx is not None else ffi.NULL
        self._map: GuestMap | None = (tap_tx.map if tap_tx is not None
                                      else tap_rx.map if tap_rx is not None else None)
        self._memory: GuestMemory | None = None
        self._seen: dict[str, int] = dict.fromkeys((*_TX_COUNTS, *_RX_COUNTS), 0)
        self._seen_drops = [0] * len(DROP_REASONS)
        self._republish: Callable[[], None] | None = None
        stats.add_collector(self.collect)

    @property
    def cdata(self) -> Any:
        return self._c

    # -- publishing ---------------------------------------------------------------------
    def publish(self, memory: GuestMemory | None, rx_watched: bool) -> None:
        """Recompute whether C may serve TX and RX, and the rings it would walk.

        ``memory``: the guest memory the device may DMA to now (None: no bus
        mastering, no client). ``rx_watched``: the loop watches the tap (RX
        in C needs the tap's wake-ups)."""
        c = self._c
        loaded = memory is not None and self._load(memory)
        tx_ring = self._tx.fast_ring() if loaded else None
        if tx_ring is not None and self._tx.fast is not None:
            self._tx.fast.set_ring(*tx_ring)
        c.tx_ready = 1 if tx_ring is not None else 0
        rx_ring = self._rx.fast_ring() if loaded and rx_watched else None
        if rx_ring is not None and self._rx.fast is not None:
            self._rx.fast.set_ring(*rx_ring, self._rx.unicast)
        c.rx_ready = 1 if rx_ring is not None else 0

    def follow(self, republish: Callable[[], None]) -> None:
        """``republish()`` (the owner's publish with its current state) runs after every
        DMA_MAP/DMA_UNMAP of the memory last published."""
        self._republish = republish

    def _load(self, memory: GuestMemory) -> bool:
        if self._map is None:
            return False
        if memory is not self._memory:
            self._memory = memory
            memory.on_change(self._memory_changed)
        return self._map.load(memory)

    def _memory_changed(self) -> None:
        if self._republish is not None:
            self._republish()

    def stop(self) -> None:
        """Nothing more for C until the next publish (detach, close)."""
        self._c.tx_ready = 0
        self._c.rx_ready = 0

    # -- what C hands back ------------------------------------------------------------
    def event(self, what: int, arg: int) -> None:
        if what == EV_TRY_SEND:
            self._interrupts.try_send(arg)
        elif what == EV_TRIGGER:
            self._msix.trigger(arg)
        elif what == EV_RX_FULL:
            self._on_rx_full()
        elif what == EV_RX_DRAIN:
            self._rx.drain(arg, "rx_ring_dma")
        elif what == EV_RX_ERRNO:
            if self._errors is not None:
                self._errors[f"rx_errno_{arg}"] += 1
        elif what == EV_TX_ERRNO:
            if self._errors is not None:
                self._errors[f"tx_errno_{arg}"] += 1
        else:
            log.error("fastlane.vf_event_unknown", what=what)

    # -- counters -----------------------------------------------------------------------
    def _delta(self, name: str) -> int:
        now = int(getattr(self._c, name))
        delta = now - self._seen[name]
        self._seen[name] = now
        return delta

    def collect(self) -> None:
        """Fold what C counted since the last call into ``VfStats`` and the backend's
        error counts, exactly as the Python queues book the same work."""
        stats, d = self._stats, self._delta
        frames, octets = d("tx_frames"), d("tx_octets")
        if frames or octets:
            stats.tx_packets(frames, octets)
        tso, segs, csum = d("tx_tso_frames"), d("tx_tso_segments"), d("tx_csum_frames")
        if tso or csum:
            stats.tx_offloads(tso, segs, csum)
        frames, octets, multicast = d("rx_frames"), d("rx_octets"), d("rx_multicast")
        if frames:
            stats.rx_packets(frames, octets, multicast)
        good, bad = d("rx_csum_good"), d("rx_csum_errors")
        if good or bad:
            stats.rx_checksums(good, bad)
        stats.rx_wakeups += d("rx_wakeups")
        drops = self._c.rx_drops
        for i, reason in enumerate(DROP_REASONS):
            now = int(drops[i])
            if now != self._seen_drops[i]:
                stats.drop(reason, now - self._seen_drops[i])
                self._seen_drops[i] = now
        errors = self._errors
        eagain, enobufs, short = d("tx_eagain"), d("tx_enobufs"), d("rx_short")
        if errors is not None:
            if eagain:
                errors["tx_eagain"] += eagain
            if enobufs:
                errors["tx_enobufs"] += enobufs
            if short:
                errors["rx_short"] += short

    @property
    def served_writes(self) -> int:
        """TDT/RDT/EIMS/EICS writes C served end to end (telemetry, tests)."""
        return int(self._c.doorbells)

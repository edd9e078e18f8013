"""The RX loop over a tap in C (``rx.c``): what ``RxQueue._poll`` does per frame.

``TapRx`` reaches guest memory through a ``GuestMap`` (shared with the TX
loop). ``RxQueue`` calls
:meth:`TapRx.poll` once its own checks say the ring can take frames; the
result carries everything the Python loop would have counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from vmsi_server import fastlane
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.guestmap import GuestMap, set_ring

log = structlog.get_logger("vmsi.fastlane.rx")

DROP_REASONS = ("rx_gso", "rx_oversize", "rx_runt", "rx_filtered", "rx_bad_buffer")
"""Index i of the job's ``drops`` is reason i (``enum vl_rx_drop``)."""

STOP_DONE, STOP_EMPTY, STOP_RING_DMA = 0, 1, 2


@dataclass(frozen=True, slots=True)
class RxResult:
    written: int
    head: int
    stop: int
    left: int
    frames: int
    octets: int
    multicast: int
    csum_good: int
    csum_errors: int
    drops: tuple[int, ...]
    read_errno: int
    short_reads: int


_bound: tuple[Any, Any] | None = None


def _ffi_lib() -> tuple[Any, Any]:
    global _bound
    if _bound is None:
        mod = fastlane.module()
        ffi = mod.ffi

        @ffi.def_extern()  # type: ignore[untyped-decorator]
        def vl_rx_accepts(handle: Any, mac: Any) -> int:
            try:
                accepts: Callable[[bytes], bool] = ffi.from_handle(handle)
                return 1 if accepts(ffi.buffer(mac, 6)[:]) else 0
            except Exception:  # never unwind into C: a filter that fails drops the frame
                log.exception("fastlane.rx_accepts_failed")
                return 0

        _bound = (ffi, mod.lib)
    return _bound


class TapRx:
    """One VF's compiled RX loop over its tap's fd."""

    def __init__(self, tap_fd: int, accepts: Callable[[bytes], bool] | None,
                 check_csum: bool = True, memory_map: GuestMap | None = None) -> None:
        ffi, lib = _ffi_lib()
        self._ffi, self._lib = ffi, lib
        self.map = memory_map if memory_map is not None else GuestMap()
        self._job = ffi.new("struct vl_rx_job *")
        self._accepts_handle = ffi.new_handle(accepts) if accepts is not None else ffi.NULL
        job = self._job
        job.tapfd = tap_fd
        job.check_csum = 1 if check_csum else 0
        job.filter = 1 if accepts is not None else 0
        job.handle = self._accepts_handle
        job.mem = self.map.cdata

    def set_ring(self, base: int, n: int, buflen: int, unicast: bytes | None) -> None:
        """What the compiled doorbell fills (``vf.c`` sets head, tail and budget)."""
        job = self._job
        job.ring_base = base
        job.ring_n = n
        job.buflen = buflen
        self._set_unicast(unicast)

    def _set_unicast(self, unicast: bytes | None) -> None:
        if unicast is not None:
            self._job.has_unicast = 1
            self._ffi.memmove(self._job.unicast, unicast, 6)
        else:
            self._job.has_unicast = 0

    @property
    def cdata(self) -> Any:
        return self._job

    def poll(self, memory: GuestMemory, base: int, n: int, head: int, tail: int,
             buflen: int, budget: int, unicast: bytes | None) -> RxResult | None:
        """Run the loop; None when this memory cannot be handed to C (Python's turn)."""
        if not self.map.load(memory):
            return None
        job = self._job
        set_ring(job, base, n, head, tail)
        job.buflen = buflen
        job.budget = budget
        self._set_unicast(unicast)
        self._lib.vl_rx_poll(job)
        return RxResult(
            int(job.written), int(job.head_out), int(job.stop), int(job.left),
            int(job.frames), int(job.octets), int(job.multicast),
            int(job.csum_good), int(job.csum_errors), tuple(job.drops),
            int(job.read_errno), int(job.short_reads),
        )

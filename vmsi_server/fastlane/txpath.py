"""The TX walk over a tap in C (``tx.c``): the packets igbvf sends at run time.

``TxQueue._walk`` hands the pending run of the ring to :meth:`TapTx.walk` first;
C sends whole packets (advanced descriptors, TSO / checksum offload / IPv4
header checksum) and stops at the first one it does not take, which the Python
walk then handles from there with all its rules. The result carries what the
Python walk would have counted for the packets C sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmsi_server import fastlane
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.guestmap import GuestMap, set_ring


@dataclass(frozen=True, slots=True)
class TxResult:
    consumed: int
    completed: int
    packets: int
    context: bytes | None
    """The last context descriptor's bytes when it changed, else None."""
    frames: int
    octets: int
    tso_frames: int
    tso_segments: int
    csum_frames: int
    send_eagain: int
    send_enobufs: int
    send_errno: int


class TapTx:
    """One VF's compiled TX walk over its tap's fd."""

    def __init__(self, tap_fd: int, memory_map: GuestMap) -> None:
        mod = fastlane.module()
        self._ffi, self._lib = mod.ffi, mod.lib
        self.map = memory_map
        self._job: Any = self._ffi.new("struct vl_tx_job *")
        self._job.tapfd = tap_fd
        self._job.mem = memory_map.cdata
        self.packets = 0
        """Packets this walk has sent (telemetry, and tests that it was used)."""

    def context(self) -> bytes | None:
        """The context descriptor in force for the compiled walk, if any."""
        job = self._job
        return self._ffi.buffer(job.ctx_raw, 16)[:] if job.have_ctx else None

    def set_context(self, raw: bytes | None) -> None:
        """Python's walk stored a context (or a reset cleared it): C must use it too."""
        job = self._job
        if raw is None:
            job.have_ctx = 0
        else:
            self._ffi.memmove(job.ctx_raw, raw, 16)
            job.have_ctx = 1

    def set_ring(self, base: int, n: int) -> None:
        """The ring the compiled doorbell walks (``vf.c`` sets head and tail)."""
        self._job.ring_base = base
        self._job.ring_n = n

    @property
    def cdata(self) -> Any:
        return self._job

    def walk(self, memory: GuestMemory, base: int, n: int, head: int, tail: int,
             context: bytes | None) -> TxResult | None:
        """Send what C takes of ``[head, tail)``; None when this memory cannot be
        handed to C. ``context``: the raw context descriptor in force, if any."""
        if not self.map.load(memory):
            return None
        ffi, job = self._ffi, self._job
        set_ring(job, base, n, head, tail)
        if context is not None:
            job.have_ctx = 1
            ffi.memmove(job.ctx_raw, context, 16)
        else:
            job.have_ctx = 0
        self._lib.vl_tx_walk(job)
        self.packets += int(job.packets)
        return TxResult(
            int(job.consumed), int(job.completed), int(job.packets),
            ffi.buffer(job.ctx_raw, 16)[:] if job.ctx_changed else None,
            int(job.frames), int(job.octets), int(job.tso_frames), int(job.tso_segments),
            int(job.csum_frames), int(job.send_eagain), int(job.send_enobufs),
            int(job.send_errno),
        )

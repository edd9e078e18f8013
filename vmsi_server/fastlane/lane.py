"""Python side of the compiled lane: a poller for the event loop, a lane per session.

``LanePoller.wait`` replaces ``epoll.poll`` in ``EventLoop.run_once``: it
returns only the (fd, events) pairs that need Python. ``SessionLane`` is one
session's lane: its read windows, whether the C side may read the socket now
(the session decides: negotiated, nothing buffered in its protocol layer),
what the C side read but left for Python, and the C side's counters, folded
into the session's ``MessageCounters`` and the windows' ``AccessStat``s as
deltas (Python only ever reads the C counters, so a snapshot taken from
another thread can at worst be a message behind).
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from vmsi_server import fastlane
from vmsi_server.pci.windows import MaskWindow, ReadWindow, RegisterRule
from vmsi_server.protocol.constants import Command
from vmsi_server.telemetry.counters import Counters, Histogram
from vmsi_server.telemetry.messages import MessageCounters

log = structlog.get_logger("vmsi.fastlane")

READ_SIZE = 1 << 20
"""Socket read size, as the Python channel's: a doorbell burst comes in one read."""

_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)


class PostedWriteTarget(Protocol):
    """What a lane hands posted REGION_WRITEs to (the session)."""

    def lane_posted_write(self, msg_id: int, region: int, offset: int, data: bytes) -> bool:
        """Apply one posted write; True when the session closed (stop reading)."""


def _bind() -> tuple[Any, Any]:
    mod = fastlane.module()
    ffi, lib = mod.ffi, mod.lib

    @ffi.def_extern()  # type: ignore[untyped-decorator]
    def vl_posted_write(handle: Any, msg_id: int, region: int, offset: int, data: Any,
                        count: int) -> int:
        try:
            target: PostedWriteTarget = ffi.from_handle(handle)
            return 1 if target.lane_posted_write(msg_id, region, offset,
                                                 ffi.buffer(data, count)[:]) else 0
        except Exception:  # never unwind into C; the session logs its own failures
            log.exception("fastlane.callback_failed")
            return 0

    return ffi, lib


_ffi: Any = None
_lib: Any = None


def _ffi_lib() -> tuple[Any, Any]:
    global _ffi, _lib
    if _ffi is None:
        _ffi, _lib = _bind()
    return _ffi, _lib


class SessionLane:
    """One connection's lane: owns the C struct; the poller serves it while enabled."""

    def __init__(self, fd: int, target: PostedWriteTarget, counters: MessageCounters,
                 windows: Sequence[ReadWindow] = (),
                 access_counters: Counters | None = None,
                 mask_windows: Sequence[MaskWindow] = (),
                 rules: Sequence[RegisterRule] = (), hot_path: Any = None) -> None:
        """``hot_path``: the device's ``struct vl_vf`` (``fastlane.vfpath``), whose
        register writes C serves before any rule or callback; it must outlive the lane."""
        ffi, lib = _ffi_lib()
        self._ffi, self._lib = ffi, lib
        raw = lib.vl_lane_new(fd, READ_SIZE)
        if raw == ffi.NULL:
            raise MemoryError("fast lane: cannot allocate")
        self._c = ffi.gc(raw, lib.vl_lane_free)
        self._handle = ffi.new_handle(target)
        self._c.handle = self._handle
        self._counters = counters
        self._windows: list[ReadWindow] = []
        self._pins: list[Any] = []
        """from_buffer views: they keep the buffers exported (so never resized) and alive."""
        self._seen_messages = {_REGION_READ: (0, 0, [0] * len(self._c.read_buckets)),
                               _REGION_WRITE: (0, 0, [0] * len(self._c.write_buckets))}
        self._masks: list[MaskWindow] = []
        self._seen_mask: list[tuple[int, int, list[int]]] = []
        self._seen_served: list[list[int]] = []
        self._seen_hist: list[list[list[int]]] = []
        self._seen_total: list[list[int]] = []
        for window in windows:
            self._add_window(window)
        for mask in mask_windows:
            self._add_mask_window(mask)
        for rule in rules:
            self._add_rule(rule)
        self._hot_path = hot_path
        if hot_path is not None:
            self._c.vf = hot_path
        self._access_counters = access_counters
        counters.add_collector(self.collect)
        if access_counters is not None:
            access_counters.add_collector(self.collect)

    @property
    def fd(self) -> int:
        return int(self._c.fd)

    @property
    def cdata(self) -> Any:
        return self._c

    def _add_window(self, window: ReadWindow) -> None:
        c = self._c
        slot = int(c.nwindows)
        if slot >= len(c.windows):
            raise ValueError(f"fast lane: more than {len(c.windows)} read windows")
        pinned = self._ffi.from_buffer(window.buffer)
        w = c.windows[slot]
        w.region = window.region
        w.mode = int(window.mode)
        w.start = window.start
        w.length = window.length
        w.bytes = self._ffi.cast("const uint8_t *", pinned)
        w.timed = 1 if window.timed and window.stats else 0
        w.enabled = 1
        c.nwindows = slot + 1
        self._pins.append(pinned)
        self._windows.append(window)
        classes = len(w.served)
        self._seen_served.append([0] * classes)
        self._seen_total.append([0] * classes)
        self._seen_hist.append([[0] * len(w.buckets[0]) for _ in range(classes)])

    def _add_mask_window(self, window: MaskWindow) -> None:
        c = self._c
        slot = int(c.nmasks)
        if slot >= len(c.masks):
            raise ValueError(f"fast lane: more than {len(c.masks)} mask windows")
        ffi = self._ffi
        dwords, pending, armed = (ffi.from_buffer(b) for b in (window.dwords, window.pending,
                                                                window.armed))
        w = c.masks[slot]
        w.region = window.region
        w.start = window.start
        w.length = window.length
        w.writable = window.writable
        w.dwords = ffi.cast("uint32_t *", dwords)
        w.pending = ffi.cast("const uint8_t *", pending)
        w.armed = ffi.cast("const uint32_t *", armed)
        w.timed = 1 if window.timed else 0
        c.nmasks = slot + 1
        self._pins.extend((dwords, pending, armed))
        self._masks.append(window)
        self._seen_mask.append((0, 0, [0] * len(w.buckets)))

    def _add_rule(self, rule: RegisterRule) -> None:
        c = self._c
        slot = int(c.nrules)
        if slot >= len(c.rules):
            raise ValueError(f"fast lane: more than {len(c.rules)} register rules")
        pinned = self._ffi.from_buffer(rule.state)
        state = self._ffi.cast("int64_t *", pinned)
        r = c.rules[slot]
        r.region = rule.region
        r.offset = rule.offset
        r.kind = int(rule.kind)
        r.mask = rule.mask
        r.target = state + rule.target
        r.guard = state + rule.guard
        c.nrules = slot + 1
        self._pins.append(pinned)

    # -- state the session sets ------------------------------------------
    def enable(self, max_xfer: int) -> None:
        self._c.max_xfer = min(max_xfer, 0xFFFFFFFF)
        self._c.enabled = 1

    def disable(self) -> None:
        self._c.enabled = 0

    @property
    def enabled(self) -> bool:
        return bool(self._c.enabled)

    # -- what the C side left ----------------------------------------------
    def take(self) -> tuple[bytes, tuple[int, ...], str | None] | None:
        """(data, fds, why the connection ended or None), or None when nothing is left.

        ``data``/``fds`` are exactly what a ``Channel.receive`` would have
        returned for the unserved rest of one read.
        """
        c = self._c
        start, end, nfds = int(c.pending_start), int(c.pending_end), int(c.nfds)
        if not (end > start or nfds or c.eof or c.error):
            return None
        data = self._ffi.buffer(c.buf + start, end - start)[:] if end > start else b""
        fds = tuple(int(c.fds[i]) for i in range(nfds))
        ended: str | None = None
        if c.error:
            ended = f"send failed: {errno.errorcode.get(int(c.error), str(int(c.error)))}"
        elif c.eof:
            ended = "peer closed the connection"
        self._lib.vl_lane_clear_pending(c)
        return data, fds, ended

    # -- counters ----------------------------------------------------------
    def collect(self) -> None:
        """Fold what the C side counted since the last call into the Python counters."""
        c = self._c
        for command, count, total, buckets_c in (
            (_REGION_READ, c.reads, c.read_ns_total, c.read_buckets),
            (_REGION_WRITE, c.writes, c.write_ns_total, c.write_buckets),
        ):
            n = int(count)
            seen_n, seen_ns, seen_buckets = self._seen_messages[command]
            if n == seen_n:
                continue
            buckets = list(buckets_c)
            ns = int(total)
            delta = [now - seen for now, seen in zip(buckets, seen_buckets, strict=True)]
            self._counters.merge(command, n - seen_n, ns - seen_ns, delta)
            self._seen_messages[command] = (n, ns, buckets)
        for index, mask in enumerate(self._masks):
            m = c.masks[index]
            served = int(m.served)
            seen_count, seen_total, seen_buckets = self._seen_mask[index]
            if served == seen_count:
                continue
            mask.stat.count += served - seen_count
            if m.timed:
                buckets = list(m.buckets)
                total = int(m.ns_total)
                mask.stat.latency.merge(_interval(
                    [a - b for a, b in zip(buckets, seen_buckets, strict=True)],
                    total - seen_total, int(m.ns_min), int(m.ns_max)))
                self._seen_mask[index] = (served, total, buckets)
            else:
                self._seen_mask[index] = (served, seen_total, seen_buckets)
        for index, window in enumerate(self._windows):
            if not window.stats:
                continue
            w = c.windows[index]
            seen_served = self._seen_served[index]
            for klass, stat in enumerate(window.stats):
                served = int(w.served[klass])
                if served == seen_served[klass]:
                    continue
                stat.count += served - seen_served[klass]
                seen_served[klass] = served
                if w.timed:
                    buckets = list(w.buckets[klass])
                    seen = self._seen_hist[index][klass]
                    total = int(w.ns_total[klass])
                    stat.latency.merge(_interval(
                        [a - b for a, b in zip(buckets, seen, strict=True)],
                        total - self._seen_total[index][klass],
                        int(w.ns_min[klass]), int(w.ns_max[klass])))
                    self._seen_hist[index][klass] = buckets
                    self._seen_total[index][klass] = total

    def close(self) -> None:
        """Final count; afterwards the counters no longer ask this lane."""
        self.collect()
        self._counters.remove_collector(self.collect)
        if self._access_counters is not None:
            self._access_counters.remove_collector(self.collect)
        self.disable()

    @property
    def served_reads(self) -> int:
        return int(self._c.reads)

    @property
    def applied_writes(self) -> int:
        """Posted writes applied in C (mask windows), not handed to Python."""
        return int(self._c.writes)

    @property
    def device_writes(self) -> int:
        """Posted writes the device's hot path served in C (doorbells, EIMS, EICS)."""
        return int(self._c.vf_writes)

    @property
    def posted_writes(self) -> int:
        return int(self._c.posted_writes)


def _interval(buckets: list[int], total: int, low: int, high: int) -> Histogram:
    """A histogram of the samples counted in C since the last collect. Their own
    min/max are not kept, so the lifetime ones stand in (as ``Histogram.minus``)."""
    h = Histogram()
    h.buckets = buckets
    h.count = sum(buckets)
    h.total = total
    h.min, h.max = low, high
    return h


class LanePoller:
    """The event loop's wait, with lanes served in C; one per ``EventLoop``."""

    def __init__(self, epoll_fd: int) -> None:
        ffi, lib = _ffi_lib()
        self._ffi, self._lib = ffi, lib
        raw = lib.vl_poller_new(epoll_fd)
        if raw == ffi.NULL:
            raise MemoryError("fast lane: cannot allocate the poller")
        self._c = ffi.gc(raw, lib.vl_poller_free)
        self._lanes: dict[int, SessionLane] = {}
        self._vfs: dict[int, Any] = {}
        """Taps served by ``vf.c`` (their structs stay referenced while registered)."""
        self._released: list[SessionLane] = []
        """Lanes removed while C may still be inside them (a callback closed its
        session): dropped at the start of the next wait, when C is not running."""
        self._max = 64
        self._fds = ffi.new("int[]", self._max)
        self._events = ffi.new("uint32_t[]", self._max)

    def add(self, lane: SessionLane) -> None:
        rc = self._lib.vl_poller_add(self._c, lane.cdata)
        if rc < 0:
            raise OSError(-rc, "fast lane: cannot register the lane")
        self._lanes[lane.fd] = lane

    def remove(self, fd: int) -> None:
        lane = self._lanes.pop(fd, None)
        if lane is not None:
            self._lib.vl_poller_remove(self._c, fd)
            self._released.append(lane)

    def add_vf(self, fd: int, vf: Any) -> None:
        """Readiness of ``fd`` (a VF's tap, already registered with the epoll) goes
        to ``vf.c`` first (``struct vl_vf``; see ``fastlane.vfpath``)."""
        rc = self._lib.vl_poller_add_vf(self._c, fd, vf)
        if rc < 0:
            raise OSError(-rc, "fast lane: cannot register the VF's tap")
        self._vfs[fd] = vf

    def remove_vf(self, fd: int) -> None:
        if self._vfs.pop(fd, None) is not None:
            self._lib.vl_poller_remove_vf(self._c, fd)

    def __len__(self) -> int:
        return len(self._lanes)

    def wait(self, timeout: float | None, max_events: int) -> list[tuple[int, int]]:
        """Like ``select.epoll.poll(timeout, max_events)``: ready fds Python must handle.

        ``timeout`` in seconds (None: forever) counts to the nanosecond where the
        kernel has epoll_pwait2, else it is rounded up to milliseconds as CPython's
        epoll does. An interrupted wait returns nothing, so that the caller's loop
        comes round and Python runs its signal handlers.
        """
        if self._released:
            self._released.clear()
        timeout_ns = -1 if timeout is None or timeout < 0 else math.ceil(timeout * 1e9)
        n = self._lib.vl_poller_wait(self._c, timeout_ns, self._fds, self._events,
                                     min(max_events, self._max))
        if n <= 0:
            if n < 0 and -n != errno.EINTR:
                raise OSError(-n, "epoll_wait failed")
            return []
        fds, events = self._fds, self._events
        return [(fds[i], events[i]) for i in range(n)]


def lane_factory() -> Callable[[int], LanePoller] | None:
    """``LanePoller`` when the module is built, else None (the loop then uses epoll)."""
    return LanePoller if fastlane.available() else None

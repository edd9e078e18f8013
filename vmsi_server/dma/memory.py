"""The guest's memory as the device sees it: DMA_MAP'd ranges plus checked access.

Every address the device dereferences (ring bases, descriptors, packet buffers)
comes from the guest, so every access is bounds-checked against exactly one
mapping before any byte moves. The hot paths (a descriptor read, a packet-buffer
view) first try the mapping that served the previous access, which is nearly
always right because a NIC works through one ring and its buffers at a time; only
misses pay for the bisect over the sorted mapping starts.

Lifetime rule for views: memoryviews from ``view()`` / ``views_for()`` are meant to
live for one operation (one readv/writev, one descriptor parse) and must not be
kept across message boundaries. DMA_UNMAP makes the range inaccessible at once;
if a caller still holds a view, the server-side munmap happens when that view is
dropped (see ``BackedRegion.release``) rather than crashing or dangling.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from types import TracebackType

import structlog

from vmsi_server.dma.errors import DmaError, DmaNotAccessible, FaultKind
from vmsi_server.dma.mapping import (
    DMA_FLAG_WRITE,
    DMA_FLAGS_KNOWN,
    BackedRegion,
    ExternalRegion,
    MappingInfo,
    Region,
    map_fd,
)
from vmsi_server.protocol.constants import DEFAULT_MAX_DMA_MAPS

_log = structlog.get_logger(__name__)

IOVA_LIMIT = 1 << 64
"""IOVAs are u64 on the wire; a range ending beyond this has wrapped."""

MAX_MAPPING_SIZE = 1 << 48
"""Largest single mapping accepted (256 TiB, the x86-64 guest-physical ceiling of
4-level paging). Larger ones are refused with ENOSPC before mmap is attempted, so a
bogus size fails cleanly instead of as a confusing mmap error."""

_EMPTY_RO = memoryview(b"")


class GuestMemory:
    """DMA mappings of one client connection, and bounds-checked access to them.

    Not thread-safe: it belongs to the single-threaded event loop that also
    handles DMA_MAP/UNMAP, which is what makes "unmap before replying" hold.
    """

    def __init__(self, max_maps: int = DEFAULT_MAX_DMA_MAPS) -> None:
        self.max_maps = max_maps
        # Parallel sorted lists: bisect needs a plain list of ints to be fast.
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self._last: BackedRegion | None = None
        self.faults: Counter[str] = Counter()
        """Refused accesses by ``FaultKind``: a guest bug or a VM misconfiguration
        shows up here even when the caller swallows the exception."""
        self.deferred_unmaps = 0
        """Unmaps whose munmap waited for outstanding views (lifetime-rule breaches)."""
        self.generation = 0
        """Bumped by every map and unmap: a cached copy of the map table is stale."""
        self._unmap_listeners: list[Callable[[], None]] = []
        self._change_listeners: list[Callable[[], None]] = []

    # -- DMA_MAP / DMA_UNMAP -------------------------------------------------------

    def add(self, iova: int, size: int, fd: int | None, offset: int, flags: int) -> None:
        """Record a DMA_MAP; takes ownership of ``fd`` and closes it in every case.

        The fd is mmapped once and closed straight away: the shared mapping alone
        keeps QEMU's memory object alive and coherent, and holding the fd would
        cost one descriptor per mapping for nothing. (Before Python 3.13, mmap
        keeps a private dup anyway, so RLIMIT_NOFILE still bounds the number of
        fd-backed mappings; exhausting it fails the map with ENOSPC.)

        A map without an fd is accepted: QEMU sends those for ROMs, VGA memory and
        any RAM outside a shared backend, and refusing them breaks the guest's
        boot. Such ranges exist for overlap checks but cannot be accessed.
        """
        try:
            index = self._check_new(iova, size, offset, flags)
            region: Region
            if fd is None:
                region = Region(iova, size, flags, offset)
            else:
                mm, delta = map_fd(fd, offset, size, bool(flags & DMA_FLAG_WRITE))
                region = BackedRegion(iova, size, flags, offset, mm, delta)
        finally:
            if fd is not None:
                with suppress(OSError):
                    os.close(fd)
        self._starts.insert(index, iova)
        self._regions.insert(index, region)
        self._changed()

    def add_mapped(self, iova: int, size: int, buffer: object, flags: int) -> None:
        """Record a DMA_MAP that another party already mmapped (libvfio-user).

        ``buffer`` exports the mapped bytes (``size`` of them, e.g. a ctypes array
        at the address libvfio-user reports); the party that mapped it unmaps it
        after ``remove()``. Read-only mappings get read-only views only.
        """
        index = self._check_new(iova, size, 0, flags)
        region = ExternalRegion(iova, size, flags, buffer)
        self._starts.insert(index, iova)
        self._regions.insert(index, region)
        self._changed()

    def _check_new(self, iova: int, size: int, offset: int, flags: int) -> int:
        """Validate a DMA_MAP against the table; return its insertion index."""
        if flags & ~DMA_FLAGS_KNOWN:
            raise DmaError(errno.EINVAL, f"DMA_MAP flags {flags:#x} has unknown bits")
        if size <= 0:
            raise DmaError(errno.EINVAL, "DMA_MAP of size 0")
        if iova < 0 or offset < 0 or iova + size > IOVA_LIMIT or offset + size > IOVA_LIMIT:
            raise DmaError(errno.EINVAL, f"DMA_MAP {iova:#x}+{size:#x} wraps around")
        if size > MAX_MAPPING_SIZE:
            raise DmaError(errno.ENOSPC, f"DMA_MAP size {size:#x} too large to track")
        if len(self._regions) >= self.max_maps:
            raise DmaError(errno.EINVAL, f"more than {self.max_maps} DMA mappings")
        index = bisect_right(self._starts, iova)
        if index > 0 and self._regions[index - 1].end > iova:
            raise DmaError(errno.EEXIST, self._overlap(iova, size, self._regions[index - 1]))
        if index < len(self._regions) and self._starts[index] < iova + size:
            raise DmaError(errno.EEXIST, self._overlap(iova, size, self._regions[index]))
        return index

    @staticmethod
    def _overlap(iova: int, size: int, other: Region) -> str:
        return (f"DMA_MAP {iova:#x}-{iova + size - 1:#x} overlaps "
                f"{other.start:#x}-{other.end - 1:#x}")

    def remove(self, iova: int, size: int) -> None:
        """DMA_UNMAP of exactly one earlier map (the spec allows no partial unmaps)."""
        index = bisect_left(self._starts, iova)
        if (index == len(self._starts) or self._starts[index] != iova
                or self._regions[index].size != size):
            raise DmaError(errno.ENOENT, f"no DMA mapping {iova:#x}+{size:#x}")
        region = self._regions.pop(index)
        del self._starts[index]
        self._release(region)

    def remove_all(self) -> None:
        """DMA_UNMAP with UNMAP_ALL, and connection teardown."""
        regions = self._regions
        self._regions = []
        self._starts = []
        for region in regions:
            self._release(region)

    def close(self) -> None:
        self.remove_all()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _release(self, region: Region) -> None:
        # Forget the cached hit first: from here on the range must fault.
        self._last = None
        self.generation += 1
        for listener in list(self._unmap_listeners):
            listener()  # drops compiled-code views first, so the munmap is not deferred
        if not region.release():
            self.deferred_unmaps += 1
            _log.warning("dma.unmap_deferred", iova=hex(region.start), size=hex(region.size),
                         reason="a memoryview of the range is still held")
        self._notify_change()

    def _changed(self) -> None:
        self.generation += 1
        self._notify_change()

    def _notify_change(self) -> None:
        for listener in list(self._change_listeners):
            listener()

    # -- for compiled code (the fast lane's RX loop) ----------------------------------

    def on_unmap(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs before any range is unmapped: whoever holds pointers
        from :meth:`host_ranges` must drop them there."""
        self._unmap_listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after every map and unmap: whoever keeps a copy of the
        table for compiled code that runs without asking reloads it there."""
        self._change_listeners.append(listener)

    def host_ranges(self) -> list[tuple[int, int, bool, memoryview, int]] | None:
        """``(iova, size, writable, whole-mapping view, index of iova in it)`` for
        every accessible mapping, or None when some mapping is not one of this
        server's own mmaps (compiled code then leaves the work to Python)."""
        out = []
        for region in self._regions:
            if type(region) is BackedRegion:
                out.append((region.start, region.size, region.writable, region.mv_rw,
                            region.start + region.shift))
            elif type(region) is not Region:  # fd-less ranges are simply not accessible
                return None
        return out

    # -- introspection ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._regions)

    def iter_mappings(self) -> Iterator[MappingInfo]:
        """Mappings in IOVA order, as snapshots (the table may change meanwhile)."""
        return iter([region.info() for region in self._regions])

    # -- access ------------------------------------------------------------------------
    #
    # Each public accessor inlines the cache test on ``_last`` and falls back to
    # ``_lookup``; the duplication is deliberate, a helper call would roughly double
    # the cost of a 16-byte descriptor read. Zero-length accesses succeed anywhere
    # and touch nothing, like a zero-length memcpy: a descriptor with length 0 is not
    # a fault.

    def read(self, iova: int, length: int) -> bytes:
        """Copy ``length`` guest bytes at ``iova``."""
        m = self._last
        if m is not None and length >= 0 and m.start <= iova and iova + length <= m.end:
            p = iova + m.shift
            return m.mm[p:p + length]
        if length == 0:
            return b""
        m = self._lookup(iova, length, False)
        p = iova + m.shift
        return m.mm[p:p + length]

    def read_into(self, iova: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from guest memory at ``iova`` without an intermediate copy."""
        if type(buffer) is not bytearray:
            buffer = memoryview(buffer).cast("B")  # slice assignment needs format "B"
        n = len(buffer)
        m = self._last
        if m is None or not (m.start <= iova and iova + n <= m.end):
            if n == 0:
                return
            m = self._lookup(iova, n, False)
        p = iova + m.shift
        buffer[:] = m.mv_ro[p:p + n]

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``iova``."""
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        m = self._last
        if m is None or not (m.writable and m.start <= iova and iova + n <= m.end):
            if n == 0:
                return
            m = self._lookup(iova, n, True)
        p = iova + m.shift
        m.mm[p:p + n] = data

    def view(self, iova: int, length: int, writable: bool = False) -> memoryview:
        """Zero-copy view of guest memory; read-only unless ``writable``.

        Refused with EPERM for a writable view of a read-only map. The view must
        not outlive the current operation (see the module docstring).
        """
        m = self._last
        if (m is not None and length >= 0 and m.start <= iova and iova + length <= m.end
                and (m.writable or not writable)):
            p = iova + m.shift
            mv = m.mv_rw if writable else m.mv_ro
            return mv[p:p + length]
        if length == 0:
            return memoryview(bytearray()) if writable else _EMPTY_RO
        m = self._lookup(iova, length, writable)
        p = iova + m.shift
        mv = m.mv_rw if writable else m.mv_ro
        return mv[p:p + length]

    def views_for(self, segments: Sequence[tuple[int, int]],
                  writable: bool = False) -> list[memoryview]:
        """Views of a scatter-gather list, for os.readv/os.writev against a tap fd.

        All segments are validated before any view is made, so a bad descriptor
        in the middle of a chain leaves nothing half-done (all-or-nothing). The
        result has one view per segment, empty ones included, so indices match.
        """
        resolved: list[tuple[BackedRegion | None, int, int]] = []
        for iova, length in segments:
            if length == 0:
                resolved.append((None, 0, 0))
                continue
            m = self._last
            if m is None or not (length > 0 and m.start <= iova and iova + length <= m.end
                                 and (m.writable or not writable)):
                m = self._lookup(iova, length, writable)
            resolved.append((m, iova + m.shift, length))
        views: list[memoryview] = []
        for m, p, length in resolved:
            if m is None:
                views.append(memoryview(bytearray()) if writable else _EMPTY_RO)
                continue
            mv = m.mv_rw if writable else m.mv_ro
            views.append(mv[p:p + length])
        return views

    def _lookup(self, iova: int, length: int, write: bool) -> BackedRegion:
        """Find the one mapping holding [iova, iova+length), caching it, or raise.

        Only the success test is done here, so a cache miss costs one bisect; the
        cause of a failure is worked out in ``_refuse``. No separate wrap test is
        needed: a range inside a mapping cannot wrap, since mappings cannot.
        """
        if length > 0:
            index = bisect_right(self._starts, iova) - 1
            if index >= 0:
                region = self._regions[index]
                if (iova + length <= region.end and isinstance(region, BackedRegion)
                        and (region.writable or not write)):
                    self._last = region
                    return region
        raise self._refuse(iova, length, write)

    def _refuse(self, iova: int, length: int, write: bool) -> DmaError:
        """Classify a refused access, count it, and build the exception to raise.

        Accesses straddling two adjacent mappings are refused (EFAULT) even when
        both are backed: they are separate mmaps with no contiguous server address,
        and QEMU only splits RAM at boundaries (PCI hole, ROMs) that no ring or
        buffer legitimately crosses.
        """
        if length < 0:
            return self._fault(FaultKind.BAD_LENGTH, errno.EINVAL,
                               f"negative DMA length {length}")
        if iova < 0 or iova + length > IOVA_LIMIT:
            return self._fault(FaultKind.WRAP, errno.EFAULT,
                               f"DMA access {iova:#x}+{length:#x} wraps around")
        index = bisect_right(self._starts, iova) - 1
        region = self._regions[index] if index >= 0 else None
        if region is None or iova >= region.end:
            return self._fault(FaultKind.UNMAPPED, errno.EFAULT,
                               f"DMA access at {iova:#x} hits no mapping")
        if iova + length > region.end:
            return self._fault(FaultKind.OUT_OF_BOUNDS, errno.EFAULT,
                               f"DMA access {iova:#x}+{length:#x} runs past mapping "
                               f"{region.start:#x}-{region.end - 1:#x}")
        if not isinstance(region, BackedRegion):
            self.faults[FaultKind.NOT_ACCESSIBLE] += 1
            reason = (f"DMA access at {iova:#x} hits guest memory "
                      f"{region.start:#x}-{region.end - 1:#x} that QEMU mapped without an fd")
            if not region.warned:
                region.warned = True
                _log.error("dma.not_accessible", iova=hex(iova), length=length,
                           mapping=hex(region.start), mapping_size=hex(region.size),
                           error=str(DmaNotAccessible(reason)))
            return DmaNotAccessible(reason)
        if write and not region.writable:
            return self._fault(FaultKind.READ_ONLY, errno.EPERM,
                               f"DMA write at {iova:#x} into read-only mapping "
                               f"{region.start:#x}-{region.end - 1:#x}")
        # Unreachable for the lengths callers pass (zero is handled before lookup).
        return DmaError(errno.EINVAL, f"DMA access {iova:#x}+{length:#x} refused")

    def _fault(self, kind: FaultKind, code: int, reason: str) -> DmaError:
        self.faults[kind] += 1
        return DmaError(code, reason)

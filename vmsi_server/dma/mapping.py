"""One DMA_MAP'd range, and turning a DMA_MAP fd into a server-side mapping.

``Region`` and ``BackedRegion`` are internal to the dma package: ``GuestMemory``
hands out only ``MappingInfo`` snapshots and short-lived memoryviews, so nobody
outside can keep the mmap object (and with it the guest's memory) alive.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
from dataclasses import dataclass

from vmsi_server.dma.errors import DmaError

DMA_FLAG_READ = 0x1
DMA_FLAG_WRITE = 0x2
DMA_FLAGS_KNOWN = DMA_FLAG_READ | DMA_FLAG_WRITE

_PAGE = mmap.ALLOCATIONGRANULARITY
_MAX_ALIGN = 1 << 30
"""Largest backing page size honoured (1 GiB hugetlbfs pages)."""

_RESOURCE_ERRNOS = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """Read-only snapshot of a mapping, for introspection and telemetry."""

    iova: int
    size: int
    flags: int
    offset: int
    accessible: bool
    """False for maps that came without an fd (ROMs, VGA, non-shared RAM)."""

    @property
    def end(self) -> int:
        """Exclusive end, so adjacent mappings satisfy ``a.end == b.iova``."""
        return self.iova + self.size

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_FLAG_WRITE)


class Region:
    """A mapped IOVA range the server cannot touch (no fd came with the DMA_MAP)."""

    __slots__ = ("end", "flags", "offset", "size", "start", "warned", "writable")

    def __init__(self, start: int, size: int, flags: int, offset: int) -> None:
        self.start = start
        self.size = size
        self.end = start + size
        self.flags = flags
        self.offset = offset
        self.writable = bool(flags & DMA_FLAG_WRITE)
        self.warned = False
        """Set once the configuration error has been logged, so a guest polling an
        inaccessible ring cannot flood the log."""

    def info(self) -> MappingInfo:
        return MappingInfo(self.start, self.size, self.flags, self.offset, accessible=False)

    def release(self) -> bool:
        """Drop the backing; returns False when the munmap had to be deferred."""
        return True


class ExternalBuffer:
    """Guest memory someone else mapped (libvfio-user), sliced like an mmap.

    Reads copy out as bytes and writes copy in, as ``mmap`` slicing does, so
    ``GuestMemory`` treats it exactly like its own mappings.
    """

    __slots__ = ("_mv",)

    def __init__(self, mv: memoryview) -> None:
        self._mv = mv

    def __getitem__(self, key: slice) -> bytes:
        return self._mv[key].tobytes()

    def __setitem__(self, key: slice, value: bytes | bytearray | memoryview) -> None:
        self._mv[key] = value

    def close(self) -> None:
        self._mv.release()


class BackedRegion(Region):
    """A range the server reaches through its own shared mmap of QEMU's fd.

    ``shift`` turns an IOVA into an index of ``mm`` with one addition: it folds in
    both the mapping's base and the delta between the page-aligned mmap offset and
    the fd offset QEMU asked for.
    """

    __slots__ = ("mm", "mv_ro", "mv_rw", "shift")

    def __init__(self, start: int, size: int, flags: int, offset: int, mm: mmap.mmap,
                 delta: int) -> None:
        super().__init__(start, size, flags, offset)
        self.mm: mmap.mmap | ExternalBuffer = mm
        self.shift = delta - start
        # Whole-mapping views made once, so view() is a single slice. Slices share
        # the underlying export, so these can be released even while slices live.
        # For a read-only map both are the same read-only view, so even a missed
        # writable check could not hand out write access.
        base = memoryview(mm)
        self.mv_rw = base
        self.mv_ro = base.toreadonly() if self.writable else base

    def info(self) -> MappingInfo:
        return MappingInfo(self.start, self.size, self.flags, self.offset, accessible=True)

    def release(self) -> bool:
        """Unmap now if nothing outside holds a view, else leave it to refcounting.

        ``mmap.close()`` refuses (BufferError) while views exported from it are alive.
        Those views hold a reference to the mmap object, so once the last one is
        dropped CPython deallocates it and munmaps. Dropping our own references
        here is therefore both safe (no dangling pointer) and sufficient.
        """
        self.mv_ro.release()
        self.mv_rw.release()
        try:
            self.mm.close()
        except BufferError:
            return False
        return True


class ExternalRegion(BackedRegion):
    """A range mapped by the owner of ``buffer`` (libvfio-user), not by us.

    The owner unmaps it right after telling us it is gone, so unlike an
    ``mmap``-backed region the unmap cannot wait for views still held: a view
    kept past its operation (which the lifetime rule forbids) would dangle.
    ``GuestMemory`` forgets the range first, so every later lookup faults.
    """

    __slots__ = ("_owner",)

    def __init__(self, start: int, size: int, flags: int, buffer: object) -> None:
        Region.__init__(self, start, size, flags, 0)
        base = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if base.nbytes != size:
            got = base.nbytes
            base.release()
            raise DmaError(errno.EINVAL, f"mapped buffer of {got:#x} bytes for a "
                                         f"{size:#x}-byte mapping")
        self._owner = buffer
        self.mm = ExternalBuffer(base)
        self.shift = -start
        self.mv_rw = base if self.writable else base.toreadonly()
        self.mv_ro = base.toreadonly()

    def release(self) -> bool:
        self.mv_ro.release()
        self.mv_rw.release()
        self.mm.close()
        self._owner = None
        return True


def _alignment(st: os.stat_result) -> int:
    """The mmap offset granularity the backing needs.

    hugetlbfs reports its huge page size in st_blksize and rejects mmap offsets not
    aligned to it; QEMU's RAM sections (e.g. starting at 1 MiB) are not. Anything
    that is not a sane power-of-two multiple of the page size falls back to pages.
    """
    blk = st.st_blksize
    if _PAGE <= blk <= _MAX_ALIGN and blk & (blk - 1) == 0:
        return blk
    return _PAGE


def map_fd(fd: int, offset: int, size: int, writable: bool) -> tuple[mmap.mmap, int]:
    """mmap ``size`` bytes of ``fd`` from ``offset``; return the mmap and the delta.

    The caller owns and closes ``fd``: the mapping keeps the memory alive by itself.
    Regular files (memfd, /dev/shm, hugetlbfs) are checked against their size first
    because mmap beyond EOF succeeds and the first access would SIGBUS the server.
    """
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise DmaError(errno.EINVAL, f"DMA_MAP fd {fd} unusable: {e.strerror}") from e
    if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
        raise DmaError(
            errno.EINVAL,
            f"DMA_MAP offset {offset:#x} + size {size:#x} exceeds the fd's size {st.st_size:#x}",
        )
    align = _alignment(st)
    base = offset - offset % align
    delta = offset - base
    length = delta + size
    if align > _PAGE:
        # Whole huge pages where the file has them: munmap of a partial one fails.
        rounded = -(-length // align) * align
        if not stat.S_ISREG(st.st_mode) or base + rounded <= st.st_size:
            length = rounded
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        if sys.version_info >= (3, 13):
            # Without trackfd Python keeps a dup of every fd: one fd per mapping.
            mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=base,
                           trackfd=False)
        else:
            mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=base)
    except OSError as e:
        code = errno.ENOSPC if e.errno in _RESOURCE_ERRNOS else errno.EFAULT
        raise DmaError(code, f"cannot mmap DMA_MAP fd: {e.strerror}") from e
    except (ValueError, OverflowError) as e:
        raise DmaError(errno.EINVAL, f"cannot mmap DMA_MAP fd: {e}") from e
    return mm, delta

"""GuestMemory against real memfds, the way QEMU's memory-backend-memfd hands them over."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator
from itertools import count

import pytest
from structlog.testing import capture_logs

from vmsi_server.dma import (
    DMA_FLAG_READ,
    DMA_FLAG_WRITE,
    MAX_MAPPING_SIZE,
    DmaError,
    DmaNotAccessible,
    FaultKind,
    GuestMemory,
)

PAGE = mmap.PAGESIZE
RW = DMA_FLAG_READ | DMA_FLAG_WRITE
RO = DMA_FLAG_READ
RAM_SIZE = 16 * PAGE
_names = count()


class Ram:
    """A memfd plus the "QEMU side" mapping of it, to check coherence from outside."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        self.name = f"vmsi-test-{os.getpid()}-{next(_names)}"
        self.fd = os.memfd_create(self.name)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def dup(self) -> int:
        """A fresh fd for one DMA_MAP, as each SCM_RIGHTS message brings its own."""
        return os.dup(self.fd)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def memfd_refs(name: str) -> tuple[int, int]:
    """(mappings, fds) in this process that still refer to memfd ``name``."""
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if f"/memfd:{name} " in line)
    fds = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{name} "):
            fds += 1
    return maps, fds


@pytest.fixture
def gm() -> Iterator[GuestMemory]:
    g = GuestMemory()
    yield g
    g.close()


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram()
    yield r
    r.close()


def expect(code: int, exc: pytest.ExceptionInfo[DmaError]) -> None:
    assert exc.value.errno == code, str(exc.value)


# -- DMA_MAP with an fd -------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 3, PAGE, PAGE + 100, 3 * PAGE - 1])
def test_fd_map_is_coherent_with_other_mappings_of_the_memfd(
        gm: GuestMemory, ram: Ram, offset: int) -> None:
    iova, size = 0x100000, 4 * PAGE
    gm.add(iova, size, ram.dup(), offset, RW)

    # QEMU writes, the server reads: byte iova+k is file byte offset+k.
    ram.mm[offset:offset + 4] = b"head"
    ram.mm[offset + size - 4:offset + size] = b"tail"
    assert gm.read(iova, 4) == b"head"
    assert gm.read(iova + size - 4, 4) == b"tail"
    if offset:
        ram.mm[offset - 1] = 0xEE  # the byte just below the mapping is not at iova
        assert gm.read(iova, 1) == b"h"

    # The server writes, QEMU sees it.
    gm.write(iova + 100, b"from-server")
    assert ram.mm[offset + 100:offset + 111] == b"from-server"
    gm.write(iova + 200, memoryview(b"mv-data"))
    assert ram.mm[offset + 200:offset + 207] == b"mv-data"

    # Views are zero-copy: later writes on either side show through.
    v = gm.view(iova + 300, 8)
    ram.mm[offset + 300:offset + 308] = b"12345678"
    assert bytes(v) == b"12345678"
    w = gm.view(iova + 400, 4, writable=True)
    w[:] = b"WXYZ"
    assert ram.mm[offset + 400:offset + 404] == b"WXYZ"
    v.release()
    w.release()

    buf = bytearray(8)
    gm.read_into(iova + 300, buf)
    assert buf == b"12345678"
    part = memoryview(bytearray(10))
    gm.read_into(iova + 300, part[2:6])
    assert part.tobytes() == b"\0\x001234\0\0\0\0"


def test_fd_is_closed_after_successful_add(gm: GuestMemory, ram: Ram) -> None:
    fd = ram.dup()
    gm.add(0, PAGE, fd, 0, RW)
    assert fd_is_closed(fd)
    # ... and the mapping keeps the memory alive without it.
    ram.mm[0:2] = b"ok"
    assert gm.read(0, 2) == b"ok"


def test_map_unmap_leaves_no_reference_to_the_memfd(gm: GuestMemory) -> None:
    r = Ram()
    r.mm.close()
    name = r.name
    gm.add(0x1000, 2 * PAGE, os.dup(r.fd), 0, RW)
    os.close(r.fd)
    assert memfd_refs(name)[0] == 1
    gm.write(0x1000, b"x")
    gm.remove(0x1000, 2 * PAGE)
    assert memfd_refs(name) == (0, 0)
    assert gm.deferred_unmaps == 0


# -- DMA_MAP without an fd ------------------------------------------------------------

def test_fdless_map_is_accepted_but_access_names_the_fix(gm: GuestMemory) -> None:
    gm.add(0xC0000, 0x20000, None, 0, RO)  # e.g. a ROM alias QEMU sends without fd
    assert len(gm) == 1
    (info,) = gm.iter_mappings()
    assert (info.iova, info.size, info.accessible) == (0xC0000, 0x20000, False)

    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(DmaNotAccessible) as exc:
                gm.read(0xC0010, 16)
            assert exc.value.errno == errno.EFAULT
            assert isinstance(exc.value, DmaError)
            message = str(exc.value)
            assert "memory-backend-memfd" in message
            assert "share=on" in message
            assert "memory-backend=mem" in message
        with pytest.raises(DmaNotAccessible):
            gm.view(0xC0000, 4)
        with pytest.raises(DmaNotAccessible):
            gm.views_for([(0xC0000, 4)])
    events = [e for e in logs if e["event"] == "dma.not_accessible"]
    assert len(events) == 1, "logged once per mapping, not per access"
    assert events[0]["log_level"] == "error"
    assert "memory-backend-memfd" in events[0]["error"]
    assert gm.faults[FaultKind.NOT_ACCESSIBLE] == 5


def test_fdless_maps_log_once_each(gm: GuestMemory) -> None:
    gm.add(0xC0000, PAGE, None, 0, RO)
    gm.add(0xE0000, PAGE, None, 0, RW)
    with capture_logs() as logs:
        for iova in (0xC0000, 0xE0000, 0xC0000, 0xE0000):
            with pytest.raises(DmaNotAccessible):
                gm.write(iova, b"x")
    assert [e["mapping"] for e in logs if e["event"] == "dma.not_accessible"] == [
        hex(0xC0000), hex(0xE0000)]


# -- DMA_MAP errors --------------------------------------------------------------------

@pytest.mark.parametrize(("iova", "size"), [
    (0x10000, 0x4000),   # identical
    (0x11000, 0x1000),   # inside
    (0xF000, 0x2000),    # straddles the start
    (0x13000, 0x2000),   # straddles the end
    (0x8000, 0x10000),   # covers
    (0x13FFF, 1),        # last byte
])
def test_overlap_is_eexist(gm: GuestMemory, iova: int, size: int) -> None:
    gm.add(0x10000, 0x4000, None, 0, RW)
    with pytest.raises(DmaError) as exc:
        gm.add(iova, size, None, 0, RW)
    expect(errno.EEXIST, exc)
    assert len(gm) == 1


def test_overlap_with_fd_closes_fd(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, 0x4000, ram.dup(), 0, RW)
    fd = ram.dup()
    with pytest.raises(DmaError) as exc:
        gm.add(0x12000, 0x4000, fd, 0, RW)
    expect(errno.EEXIST, exc)
    assert fd_is_closed(fd)


def test_touching_mappings_are_fine(gm: GuestMemory) -> None:
    gm.add(0x10000, 0x4000, None, 0, RW)
    gm.add(0x14000, 0x1000, None, 0, RW)   # right after
    gm.add(0xF000, 0x1000, None, 0, RW)    # right before
    assert [m.iova for m in gm.iter_mappings()] == [0xF000, 0x10000, 0x14000]
    assert len(gm) == 3


@pytest.mark.parametrize(("iova", "size", "offset", "flags", "code"), [
    (0x1000, 0, 0, RW, errno.EINVAL),                        # size 0
    (2**64 - PAGE, 2 * PAGE, 0, RW, errno.EINVAL),           # iova + size wraps
    (0, PAGE, 2**64 - 1, RW, errno.EINVAL),                  # offset + size wraps
    (-PAGE, PAGE, 0, RW, errno.EINVAL),                      # not a u64
    (0x1000, PAGE, 0, RW | 0x4, errno.EINVAL),               # unknown flag bit
    (0, MAX_MAPPING_SIZE + PAGE, 0, RW, errno.ENOSPC),       # too large to track
])
def test_bad_map_arguments(gm: GuestMemory, ram: Ram, iova: int, size: int, offset: int,
                           flags: int, code: int) -> None:
    for fd in (None, ram.dup()):
        with pytest.raises(DmaError) as exc:
            gm.add(iova, size, fd, offset, flags)
        expect(code, exc)
        if fd is not None:
            assert fd_is_closed(fd)
    assert len(gm) == 0


def test_largest_trackable_mapping_is_accepted_without_fd(gm: GuestMemory) -> None:
    gm.add(0, MAX_MAPPING_SIZE, None, 0, RW)
    assert len(gm) == 1


def test_max_maps(ram: Ram) -> None:
    g = GuestMemory(max_maps=2)
    g.add(0, PAGE, ram.dup(), 0, RW)
    g.add(PAGE, PAGE, None, 0, RW)
    fd = ram.dup()
    with pytest.raises(DmaError) as exc:
        g.add(2 * PAGE, PAGE, fd, 0, RW)
    expect(errno.EINVAL, exc)
    assert fd_is_closed(fd)
    assert len(g) == 2
    g.remove(PAGE, PAGE)
    g.add(2 * PAGE, PAGE, None, 0, RW)  # room again after an unmap
    g.close()


def test_unmappable_fd_pipe(gm: GuestMemory) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DmaError) as exc:
            gm.add(0, PAGE, r, 0, RW)
        assert exc.value.errno in (errno.EINVAL, errno.EFAULT)
        assert fd_is_closed(r)
        assert len(gm) == 0
    finally:
        os.close(w)


@pytest.mark.parametrize(("offset", "size"), [
    (0, RAM_SIZE + PAGE),                  # size beyond the file
    (RAM_SIZE - PAGE + 1, PAGE),           # offset + size one byte beyond
    (RAM_SIZE + PAGE, PAGE),               # offset beyond the file
])
def test_fd_too_small_is_refused_and_closed(gm: GuestMemory, ram: Ram, offset: int,
                                            size: int) -> None:
    fd = ram.dup()
    with pytest.raises(DmaError) as exc:
        gm.add(0, size, fd, offset, RW)
    expect(errno.EINVAL, exc)
    assert fd_is_closed(fd)
    assert len(gm) == 0


def test_fd_exactly_fitting_the_file_is_accepted(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0, PAGE - 1, ram.dup(), RAM_SIZE - PAGE + 1, RW)
    ram.mm[RAM_SIZE - 1] = 0x5A
    assert gm.read(PAGE - 2, 1) == b"\x5a"


def test_closed_fd_is_refused(gm: GuestMemory, ram: Ram) -> None:
    fd = ram.dup()
    os.close(fd)
    with pytest.raises(DmaError) as exc:
        gm.add(0, PAGE, fd, 0, RW)
    assert exc.value.errno in (errno.EINVAL, errno.EFAULT)
    assert len(gm) == 0


def test_readonly_fd_cannot_be_mapped_writable(gm: GuestMemory, ram: Ram) -> None:
    fd = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY)
    with pytest.raises(DmaError) as exc:
        gm.add(0, PAGE, fd, 0, RW)
    assert exc.value.errno == errno.EFAULT
    assert fd_is_closed(fd)
    fd = os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY)
    gm.add(0, PAGE, fd, 0, RO)  # read-only DMA_MAP of a read-only fd is fine
    assert fd_is_closed(fd)


# -- DMA_UNMAP -------------------------------------------------------------------------

def test_unmap_exact_match_only(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, 0x4000, ram.dup(), 0, RW)
    gm.add(0x20000, 0x1000, None, 0, RW)
    for iova, size in [(0x10000, 0x1000), (0x10000, 0x8000), (0x11000, 0x1000),
                       (0x30000, 0x1000), (0x0, 0x4000)]:
        with pytest.raises(DmaError) as exc:
            gm.remove(iova, size)
        expect(errno.ENOENT, exc)
    assert len(gm) == 2
    assert gm.read(0x10000, 1) == b"\0"  # also primes the lookup cache

    gm.remove(0x10000, 0x4000)
    with pytest.raises(DmaError) as exc:
        gm.read(0x10000, 1)  # not served from a stale cache entry
    expect(errno.EFAULT, exc)
    with pytest.raises(DmaError) as exc:
        gm.remove(0x10000, 0x4000)
    expect(errno.ENOENT, exc)
    gm.remove(0x20000, 0x1000)  # fd-less maps unmap the same way
    assert len(gm) == 0


def test_remove_all(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0, PAGE, ram.dup(), 0, RW)
    gm.add(PAGE, PAGE, ram.dup(), PAGE, RO)
    gm.add(0xC0000, PAGE, None, 0, RO)
    gm.read(0, 1)
    gm.remove_all()
    assert len(gm) == 0
    assert list(gm.iter_mappings()) == []
    with pytest.raises(DmaError) as exc:
        gm.read(0, 1)
    expect(errno.EFAULT, exc)
    gm.add(0, 2 * PAGE, ram.dup(), 0, RW)  # the same range can be mapped again
    assert len(gm) == 1


def test_unmap_while_view_exported(gm: GuestMemory) -> None:
    r = Ram()
    r.mm.close()
    name = r.name
    gm.add(0x10000, 2 * PAGE, os.dup(r.fd), 0, RW)
    os.close(r.fd)
    gm.write(0x10000, b"still-here")
    held = gm.view(0x10000, 16, writable=True)

    with capture_logs() as logs:
        gm.remove(0x10000, 2 * PAGE)  # must not raise BufferError
    assert gm.deferred_unmaps == 1
    assert [e["event"] for e in logs] == ["dma.unmap_deferred"]
    with pytest.raises(DmaError) as exc:
        gm.read(0x10000, 1)
    expect(errno.EFAULT, exc)
    assert gm.faults[FaultKind.UNMAPPED] == 1

    # The held view still points at live memory (no crash), and the munmap
    # happens as soon as it is dropped.
    assert bytes(held[:10]) == b"still-here"
    held[0] = ord("S")
    assert memfd_refs(name)[0] == 1
    held.release()
    assert memfd_refs(name) == (0, 0)


def test_remove_all_while_views_exported(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0, PAGE, ram.dup(), 0, RW)
    views = gm.views_for([(0, 4), (8, 4)], writable=True)
    gm.remove_all()
    assert gm.deferred_unmaps == 1
    with pytest.raises(DmaError):
        gm.view(0, 4)
    del views


# -- access bounds ---------------------------------------------------------------------

ACCESSORS: list[Callable[[GuestMemory, int, int], object]] = [
    lambda gm, iova, length: gm.read(iova, length),
    lambda gm, iova, length: gm.read_into(iova, bytearray(length)),
    lambda gm, iova, length: gm.write(iova, b"\xff" * length),
    lambda gm, iova, length: gm.view(iova, length),
    lambda gm, iova, length: gm.view(iova, length, writable=True),
    lambda gm, iova, length: gm.views_for([(iova, length)]),
    lambda gm, iova, length: gm.views_for([(iova, length)], writable=True),
]


def test_access_must_lie_in_one_mapping(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RW)
    gm.add(0x10000 + PAGE, PAGE, ram.dup(), PAGE, RW)  # adjacent, even contiguous in file
    end = 0x10000 + 2 * PAGE
    assert gm.read(0x10000 + PAGE - 1, 1) == b"\0"
    assert gm.read(end - 4, 4) == b"\0" * 4

    cases = [
        (end - 2, 4, FaultKind.OUT_OF_BOUNDS),          # straddles the end
        (0x10000 + PAGE - 2, 4, FaultKind.OUT_OF_BOUNDS),  # straddles two mappings
        (end, 1, FaultKind.UNMAPPED),                    # one past the end
        (0xFFFF, 2, FaultKind.UNMAPPED),                 # starts just below
        (0, 1, FaultKind.UNMAPPED),                      # below everything
        (2**64 - 2, 4, FaultKind.WRAP),                  # wraps around
        (-1, 1, FaultKind.WRAP),
    ]
    for iova, length, kind in cases:
        before = gm.faults[kind]
        for access in ACCESSORS:
            with pytest.raises(DmaError) as exc:
                access(gm, iova, length)
            expect(errno.EFAULT, exc)
        assert gm.faults[kind] == before + len(ACCESSORS), kind
    assert ram.mm[:2 * PAGE] == b"\0" * 2 * PAGE, "a refused write touched memory"


def test_cache_does_not_widen_bounds(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RW)
    gm.read(0x10000, 1)  # cache this mapping
    with pytest.raises(DmaError):
        gm.read(0x10000 + PAGE - 1, 2)
    with pytest.raises(DmaError):
        gm.write(0x10000 - 1, b"ab")
    with pytest.raises(DmaError) as exc:
        gm.read(0x10000, -1)
    expect(errno.EINVAL, exc)
    with pytest.raises(DmaError):
        gm.view(0x10000, -1)
    assert gm.faults[FaultKind.BAD_LENGTH] == 2


def test_zero_length_access_is_allowed_anywhere(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RO)
    gm.add(0xC0000, PAGE, None, 0, RW)
    for iova in (0x10000, 0x10000 + PAGE, 0xC0000, 0x999999, 2**64):
        assert gm.read(iova, 0) == b""
        gm.read_into(iova, bytearray())
        gm.write(iova, b"")
        assert gm.view(iova, 0).nbytes == 0
        assert gm.view(iova, 0, writable=True).nbytes == 0
        assert [v.nbytes for v in gm.views_for([(iova, 0)], writable=True)] == [0]
    assert sum(gm.faults.values()) == 0


def test_readonly_map_refuses_writes_with_eperm(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RO)
    gm.add(0x20000, PAGE, ram.dup(), PAGE, RW)
    ram.mm[0:3] = b"rom"
    assert gm.read(0x10000, 3) == b"rom"  # caches the read-only mapping
    v = gm.view(0x10000, 3)
    assert v.readonly and bytes(v) == b"rom"
    for attempt in (
        lambda: gm.write(0x10000, b"RAM"),
        lambda: gm.view(0x10000, 3, writable=True),
        lambda: gm.views_for([(0x20000, 4), (0x10000, 3)], writable=True),
    ):
        with pytest.raises(DmaError) as exc:
            attempt()
        expect(errno.EPERM, exc)
    assert gm.faults[FaultKind.READ_ONLY] == 3
    assert ram.mm[0:3] == b"rom"
    # A read-only view of a writable map is read-only too.
    assert gm.view(0x20000, 4).readonly
    assert not gm.view(0x20000, 4, writable=True).readonly


def test_switching_between_mappings(gm: GuestMemory, ram: Ram) -> None:
    """The last-hit cache must follow the address, not stick to one mapping."""
    gm.add(0x10000, PAGE, ram.dup(), 0, RW)
    gm.add(0x90000, PAGE, ram.dup(), 2 * PAGE, RW)
    ram.mm[0] = 1
    ram.mm[2 * PAGE] = 2
    for _ in range(3):
        assert gm.read(0x10000, 1) == b"\x01"
        assert gm.read(0x90000, 1) == b"\x02"
    gm.write(0x10000 + 5, b"a")
    gm.write(0x90000 + 5, b"b")
    assert (ram.mm[5], ram.mm[2 * PAGE + 5]) == (ord("a"), ord("b"))


# -- scatter / gather --------------------------------------------------------------------

def test_views_for_moves_bytes_with_readv_writev(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RW)
    gm.add(0x80000, PAGE, ram.dup(), 4 * PAGE, RW)
    segments = [(0x10000 + 10, 5), (0x80000, 0), (0x80000 + PAGE - 6, 6)]
    r, w = os.pipe()
    try:
        os.write(w, b"hello world")
        rx = gm.views_for(segments, writable=True)
        assert [v.nbytes for v in rx] == [5, 0, 6]
        assert os.readv(r, rx) == 11
        for v in rx:
            v.release()
        assert ram.mm[10:15] == b"hello"
        assert ram.mm[5 * PAGE - 6:5 * PAGE] == b" world"

        tx = gm.views_for(segments)
        assert all(v.readonly for v in tx)
        assert os.writev(w, tx) == 11
        assert os.read(r, 64) == b"hello world"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_views_for_is_all_or_nothing(gm: GuestMemory, ram: Ram, bad: int) -> None:
    gm.add(0x10000, PAGE, ram.dup(), 0, RW)
    segments = [(0x10000, 64), (0x10000 + 64, 64), (0x10000 + 128, 64)]
    segments[bad] = (0x10000 + PAGE - 8, 64)  # runs off the end
    with pytest.raises(DmaError) as exc:
        gm.views_for(segments, writable=True)
    expect(errno.EFAULT, exc)
    assert gm.faults[FaultKind.OUT_OF_BOUNDS] == 1
    # Nothing was left exported: the unmap completes immediately.
    gm.remove(0x10000, PAGE)
    assert gm.deferred_unmaps == 0


# -- misc ---------------------------------------------------------------------------------

def test_iter_mappings_snapshot(gm: GuestMemory, ram: Ram) -> None:
    gm.add(0x20000, PAGE, ram.dup(), PAGE + 8, RO)
    gm.add(0x10000, 2 * PAGE, None, 0, RW)
    infos = list(gm.iter_mappings())
    assert [(i.iova, i.size, i.end, i.flags, i.offset, i.accessible, i.writable)
            for i in infos] == [
        (0x10000, 2 * PAGE, 0x10000 + 2 * PAGE, RW, 0, False, True),
        (0x20000, PAGE, 0x20000 + PAGE, RO, PAGE + 8, True, False),
    ]
    assert len(gm) == 2


def test_error_text_and_context_manager(ram: Ram) -> None:
    with GuestMemory() as g:
        g.add(0, PAGE, ram.dup(), 0, RW)
        with pytest.raises(DmaError) as exc:
            g.add(0, PAGE, None, 0, RW)
        assert str(exc.value).startswith("EEXIST: ")
        assert exc.value.reason in str(exc.value)
        assert not isinstance(exc.value, OSError)
    assert len(g) == 0

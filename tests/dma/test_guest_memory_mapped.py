"""GuestMemory.add_mapped: memory someone else (libvfio-user) already mapped."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from vmsi_server.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, DmaError, GuestMemory

RW = DMA_FLAG_READ | DMA_FLAG_WRITE
IOVA = 0x10_0000
SIZE = 0x4000


def _buffer(size: int = SIZE) -> ctypes.Array[ctypes.c_ubyte]:
    """What the adapter hands over: a ctypes array at the library's vaddr."""
    return (ctypes.c_ubyte * size)()


def test_reads_writes_and_views_reach_the_foreign_bytes() -> None:
    buf = _buffer()
    with GuestMemory() as mem:
        mem.add_mapped(IOVA, SIZE, buf, RW)
        ctypes.memmove(ctypes.addressof(buf) + 0x10, b"descriptor", 10)
        assert mem.read(IOVA + 0x10, 10) == b"descriptor"
        assert isinstance(mem.read(IOVA + 0x10, 10), bytes)
        mem.write(IOVA + 0x100, b"packet")
        assert bytes(buf[0x100:0x106]) == b"packet"
        mem.write(IOVA + 0x200, memoryview(b"mv"))
        assert bytes(buf[0x200:0x202]) == b"mv"
        view = mem.view(IOVA + 0x100, 6, writable=True)
        view[:] = b"PACKET"
        del view
        assert bytes(buf[0x100:0x106]) == b"PACKET"
        target = bytearray(6)
        mem.read_into(IOVA + 0x100, target)
        assert target == b"PACKET"
        a, b = mem.views_for([(IOVA, 4), (IOVA + 0x100, 6)])
        assert bytes(b) == b"PACKET" and a.readonly
        del a, b
        [info] = mem.iter_mappings()
        assert (info.iova, info.size, info.accessible) == (IOVA, SIZE, True)


def test_os_readv_writev_work_on_foreign_views() -> None:
    buf = _buffer()
    r, w = os.pipe()
    try:
        with GuestMemory() as mem:
            mem.add_mapped(IOVA, SIZE, buf, RW)
            os.write(w, b"from the tap")
            [view] = mem.views_for([(IOVA + 8, 12)], writable=True)
            assert os.readv(r, [view]) == 12
            del view
            assert bytes(buf[8:20]) == b"from the tap"
            assert os.writev(w, mem.views_for([(IOVA + 8, 12)])) == 12
            assert os.read(r, 12) == b"from the tap"
    finally:
        os.close(r)
        os.close(w)


def test_read_only_mapping_refuses_writes() -> None:
    buf = _buffer()
    with GuestMemory() as mem:
        mem.add_mapped(IOVA, SIZE, buf, DMA_FLAG_READ)
        with pytest.raises(DmaError) as info:
            mem.write(IOVA, b"x")
        assert info.value.errno == errno.EPERM
        with pytest.raises(DmaError):
            mem.view(IOVA, 4, writable=True)
        assert mem.view(IOVA, 4).readonly


def test_remove_makes_the_range_fault_at_once() -> None:
    buf = _buffer()
    with GuestMemory() as mem:
        mem.add_mapped(IOVA, SIZE, buf, RW)
        assert mem.read(IOVA, 4) == bytes(4)  # primes the last-hit cache
        mem.remove(IOVA, SIZE)
        with pytest.raises(DmaError) as info:
            mem.read(IOVA, 4)
        assert info.value.errno == errno.EFAULT
        assert mem.deferred_unmaps == 0


def test_overlap_and_size_mismatch_are_refused() -> None:
    with GuestMemory() as mem:
        mem.add_mapped(IOVA, SIZE, _buffer(), RW)
        with pytest.raises(DmaError) as info:
            mem.add_mapped(IOVA + 0x1000, SIZE, _buffer(), RW)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(DmaError, match="mapped buffer"):
            mem.add_mapped(0x90_0000, SIZE, _buffer(SIZE // 2), RW)
        assert len(mem) == 1

"""Shared helpers for the NIC data-path tests (no tests here).

* ``Guest``: real memfd-backed guest RAM behind the real ``GuestMemory``, plus the
  "QEMU side" mapping to write rings and buffers and to check what the device wrote.
* Frame builders that prepare packets the way igbvf hands them to the device.
* Checksum verification written independently of ``vmsi_server.nic.offload`` (a plain
  16-bit word loop), so the offload code is checked against something else.
"""

from __future__ import annotations

import mmap
import os
import struct
from itertools import count

from vmsi_server.dma import DMA_FLAG_READ, DMA_FLAG_WRITE, GuestMemory
from vmsi_server.nic.descriptors import DESC_SIZE, RXDCTL_ENABLE, TXDCTL_ENABLE
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import TxQueue

RW = DMA_FLAG_READ | DMA_FLAG_WRITE
_names = count()

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")
SRC4 = bytes([10, 0, 0, 1])
DST4 = bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")


class Guest:
    """Guest RAM: ``size`` bytes at IOVA ``base``, with a bump allocator."""

    def __init__(self, size: int = 4 << 20, base: int = 0x10_0000) -> None:
        self.base = base
        self.size = size
        self.fd = os.memfd_create(f"vmsi-nic-test-{os.getpid()}-{next(_names)}")
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.memory = GuestMemory()
        self.memory.add(base, size, os.dup(self.fd), 0, RW)
        self._next = base + 0x1000

    @property
    def end(self) -> int:
        return self.base + self.size

    def alloc(self, n: int, align: int = 128) -> int:
        addr = -(-self._next // align) * align
        self._next = addr + n
        assert self._next <= self.end, "test guest RAM exhausted"
        return addr

    def write(self, iova: int, data: bytes) -> None:
        p = iova - self.base
        self.mm[p:p + len(data)] = data

    def read(self, iova: int, n: int) -> bytes:
        p = iova - self.base
        return self.mm[p:p + n]

    def fill(self, byte: int = 0xA5) -> None:
        self.mm[:] = bytes([byte]) * self.size

    def snapshot(self) -> bytes:
        return self.mm[:]

    def changed(self, before: bytes) -> list[tuple[int, int]]:
        """IOVA ranges [start, end) of bytes that differ from ``before``."""
        now = self.mm[:]
        out: list[tuple[int, int]] = []
        page = 4096
        for base in range(0, len(now), page):
            if now[base:base + page] == before[base:base + page]:
                continue
            for i in range(base, min(base + page, len(now))):
                if now[i] != before[i]:
                    if out and out[-1][1] == self.base + i:
                        out[-1] = (out[-1][0], self.base + i + 1)
                    else:
                        out.append((self.base + i, self.base + i + 1))
        return out

    def close(self) -> None:
        self.memory.close()
        self.mm.close()
        os.close(self.fd)


def assert_only_changed(guest: Guest, before: bytes, allowed: list[tuple[int, int]]) -> None:
    """Every byte that changed lies inside one of the ``allowed`` [start, end) ranges."""
    for start, end in guest.changed(before):
        assert any(a <= start and end <= b for a, b in allowed) or all(
            any(a <= pos < b for a, b in allowed) for pos in range(start, end)
        ), f"write outside the expected buffers at {start:#x}..{end:#x}"


def enable_tx(q: TxQueue, base: int, count_: int) -> None:
    q.bal, q.bah, q.len = base & 0xFFFFFFFF, base >> 32, count_ * DESC_SIZE
    q.head = q.tail = 0
    q.txdctl = TXDCTL_ENABLE


def enable_rx(q: RxQueue, base: int, count_: int, srrctl: int = 0x82000002) -> None:
    q.bal, q.bah, q.len = base & 0xFFFFFFFF, base >> 32, count_ * DESC_SIZE
    q.head = q.tail = 0
    q.srrctl = srrctl
    q.rxdctl = 0x02010810 | RXDCTL_ENABLE


def new_stats() -> VfStats:
    return VfStats()


# -- independent checksum reference -------------------------------------------------------


def ref_sum(data: bytes) -> int:
    """Plain ones'-complement sum of 16-bit big-endian words (odd byte padded)."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for (w,) in struct.iter_unpack(">H", data):
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4_header_ok(ip: bytes) -> bool:
    ihl = (ip[0] & 0xF) * 4
    return ref_sum(ip[:ihl]) == 0xFFFF


def l4_ok(frame: bytes, l3: int) -> bool:
    """Whether the TCP/UDP checksum of the IPv4/IPv6 packet at ``l3`` verifies."""
    if frame[l3] >> 4 == 4:
        ihl = (frame[l3] & 0xF) * 4
        total = struct.unpack_from(">H", frame, l3 + 2)[0]
        proto = frame[l3 + 9]
        seg = frame[l3 + ihl:l3 + total]
        pseudo = frame[l3 + 12:l3 + 20] + struct.pack(">BBH", 0, proto, len(seg))
    else:
        plen = struct.unpack_from(">H", frame, l3 + 4)[0]
        proto = frame[l3 + 6]
        seg = frame[l3 + 40:l3 + 40 + plen]
        pseudo = frame[l3 + 8:l3 + 40] + struct.pack(">IxxxB", len(seg), proto)
    return ref_sum(pseudo + seg) == 0xFFFF


# -- frame builders ---------------------------------------------------------------------------


def eth(ethertype: int, dst: bytes = DST_MAC, src: bytes = SRC_MAC) -> bytes:
    return dst + src + struct.pack(">H", ethertype)


def tcp_header(seq: int = 1000, flags: int = 0x18, options: bytes = b"") -> bytearray:
    doff = (20 + len(options)) // 4
    return bytearray(struct.pack(">HHIIBBHHH", 40000, 5201, seq, 1, doff << 4, flags,
                                 65535, 0, 0) + options)


def ipv4_tcp(payload: bytes, *, tso: bool = False, flags: int = 0x18, ip_id: int = 7,
             options: bytes = b"") -> bytes:
    """IPv4/TCP frame as igbvf prepares it: TCP check = pseudo-header sum (with the
    length for a checksum-offload packet, without it for TSO, where tot_len is 0 and
    the IP check holds igbvf's 0xFFFF seed)."""
    tcp = tcp_header(flags=flags, options=options)
    l4len = len(tcp) + len(payload)
    tot = 0 if tso else 20 + l4len
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, tot, ip_id, 0x4000, 64, 6, 0,
                               SRC4, DST4))
    if tso:
        ip[10:12] = b"\xff\xff"
    pseudo = ref_sum(SRC4 + DST4 + struct.pack(">BBH", 0, 6, 0 if tso else l4len))
    struct.pack_into(">H", tcp, 16, pseudo)
    return eth(0x0800) + bytes(ip) + bytes(tcp) + payload


def ipv6_tcp(payload: bytes, *, tso: bool = False, flags: int = 0x18) -> bytes:
    tcp = tcp_header(flags=flags)
    l4len = len(tcp) + len(payload)
    ip = struct.pack(">IHBB16s16s", 0x60000000, 0 if tso else l4len, 6, 64, SRC6, DST6)
    pseudo = ref_sum(SRC6 + DST6 + struct.pack(">IxxxB", 0 if tso else l4len, 6))
    struct.pack_into(">H", tcp, 16, pseudo)
    return eth(0x86DD) + ip + bytes(tcp) + payload


def ipv4_udp(payload: bytes) -> bytes:
    """IPv4/UDP with the CHECKSUM_PARTIAL pseudo-header seed in the check field."""
    ulen = 8 + len(payload)
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 9, 0, 64, 17, 0,
                               SRC4, DST4))
    struct.pack_into(">H", ip, 10, ~ref_sum(bytes(ip)) & 0xFFFF)
    pseudo = ref_sum(SRC4 + DST4 + struct.pack(">BBH", 0, 17, ulen))
    udp = struct.pack(">HHHH", 5000, 5001, ulen, pseudo)
    return eth(0x0800) + bytes(ip) + udp + payload


def ipv4_fixed(frame: bytes) -> bytes:
    """``frame`` with a correct IPv4 header checksum (for checksum-offload builders)."""
    b = bytearray(frame)
    b[24:26] = b"\0\0"
    struct.pack_into(">H", b, 24, ~ref_sum(bytes(b[14:34])) & 0xFFFF)
    return bytes(b)


def payload_bytes(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


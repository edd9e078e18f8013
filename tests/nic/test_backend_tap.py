"""TapBackend against the real kernel, in a private network namespace.

Topology: our tap ``vt0`` (IFF_VNET_HDR, the device's wire) and a plain tap ``vt1``
(no vnet header, no offloads) in one bridge. What the TX queue writes to ``vt0`` as a
GSO super-frame must come out of ``vt1`` segmented by the kernel, with every checksum
right; what is written into ``vt1`` arrives through ``vt0`` in guest memory.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count

import pytest
from test_descriptors_helpers import (
    SRC_MAC,
    Guest,
    enable_rx,
    enable_tx,
    ipv4_fixed,
    ipv4_header_ok,
    ipv4_tcp,
    ipv4_udp,
    ipv6_tcp,
    l4_ok,
    payload_bytes,
)

from vmsi_server import fastlane
from vmsi_server.fastlane.guestmap import GuestMap
from vmsi_server.fastlane.rxpath import TapRx
from vmsi_server.fastlane.txpath import TapTx
from vmsi_server.nic import descriptors as d
from vmsi_server.nic.backend.tap import (
    IFF_NO_PI,
    IFF_TAP,
    TUNSETIFF,
    TapBackend,
    interface_exists,
)
from vmsi_server.nic.descriptors import RxReadDesc, RxWritebackDesc, TxContextDesc, TxDataDesc
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import TxQueue

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2 (network namespaces)",
)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_ns_names = count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``ns``; always come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vmsi-nic-{os.getpid()}-{next(_ns_names)}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def plain_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


@pytest.fixture
def wire(netns: str) -> Iterator[tuple[TapBackend, int, str]]:
    """(our vnet tap vt0, fd of the peer tap vt1, namespace), bridged."""
    with inside(netns):
        tap = TapBackend("vt0")
        peer = plain_tap("vt1")
    try:
        ip("-n", netns, "link", "add", "br0", "type", "bridge")
        for dev in ("vt0", "vt1"):
            ip("-n", netns, "link", "set", dev, "master", "br0")
        for dev in ("vt1", "br0"):
            ip("-n", netns, "link", "set", dev, "up")
        yield tap, peer, netns
    finally:
        tap.close()
        os.close(peer)


def read_frames(fd: int, want: int, ethertype: bytes, timeout: float = 3.0) -> list[bytes]:
    """Frames from ``fd`` sent by the test's source MAC with ``ethertype`` (the kernel's
    own IPv6 neighbour/MLD chatter is skipped)."""
    match = SRC_MAC + ethertype
    out: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(out) < want and poller.poll(int(timeout * 1000)):
        while True:
            try:
                f = os.read(fd, 70000)
            except BlockingIOError:
                break
            if f[6:14] == match:
                out.append(f)
    return out


def _compiled_tx(tap: TapBackend, compiled: bool) -> TapTx | None:
    """The compiled TX walk over ``tap`` (fastlane/tx.c), or None for the Python walk."""
    if not compiled:
        return None
    if not fastlane.available():
        pytest.skip(f"fast lane: {fastlane.unavailable_reason()}")
    fd = tap.fileno()
    assert fd is not None
    return TapTx(fd, GuestMap())


COMPILED = pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])


def _tso_through_kernel(tap: TapBackend, peer: int, v6: bool, vlan: int | None = None,
                        compiled: bool = False) -> None:
    guest = Guest()
    try:
        stats = VfStats()
        q = TxQueue(lambda: guest.memory, tap, stats, fast=_compiled_tx(tap, compiled))
        ring = guest.alloc(32 * 16)
        enable_tx(q, ring, 32)
        payload = payload_bytes(20000)
        frame = ipv6_tcp(payload, tso=True) if v6 else ipv4_tcp(payload, tso=True)
        l4 = 54 if v6 else 34
        buf = guest.alloc(len(frame))
        guest.write(buf, frame)
        tucmd = d.TUCMD_L4T_TCP | (0 if v6 else d.TUCMD_IPV4)
        guest.write(ring, TxContextDesc.build(14, l4 - 14, tucmd, 20, 1448, vlan or 0).pack())
        vle = vlan is not None
        guest.write(ring + 16, TxDataDesc.build(buf, l4 + 20, eop=False, rs=False, tse=True,
                                                vle=vle, popts=d.TXD_POPTS_TXSM,
                                                paylen=20000).pack())
        guest.write(ring + 32, TxDataDesc.build(buf + l4 + 20, 20000, tse=True, vle=vle).pack())
        q.tail = 3
        assert q.doorbell() == 1
        assert tap.errors == {}
        ethertype = b"\x86\xdd" if v6 else b"\x08\x00"
        if vlan is not None:
            segs = read_frames(peer, 14, b"\x81\x00")
            assert all(s[14:18] == struct.pack(">H", vlan) + ethertype for s in segs)
            segs = [s[:12] + s[16:] for s in segs]  # untag, then check as usual
        else:
            segs = read_frames(peer, 14, ethertype)
        assert len(segs) == 14
        assert b"".join(s[l4 + 20:] for s in segs) == payload
        for i, s in enumerate(segs):
            assert l4_ok(s, 14), f"segment {i}: TCP checksum"
            if not v6:
                assert ipv4_header_ok(s[14:34])
            assert struct.unpack_from(">I", s, l4 + 4)[0] == 1000 + i * 1448
        assert stats.gptc == 14
        assert stats.tx_tso_frames == 1 and stats.tx_tso_segments == 14
        assert q.head == 3
        if q.fast is not None:  # sent by C, except VLAN insertion (left to Python)
            assert q.fast.packets == (0 if vlan is not None else 1)
    finally:
        guest.close()


@COMPILED
def test_tso_ipv4_segmented_by_kernel(wire: tuple[TapBackend, int, str], compiled: bool) -> None:
    tap, peer, _ = wire
    _tso_through_kernel(tap, peer, v6=False, compiled=compiled)


@COMPILED
def test_tso_vlan_inserted_and_segmented_by_kernel(wire: tuple[TapBackend, int, str],
                                                   compiled: bool) -> None:
    tap, peer, _ = wire
    _tso_through_kernel(tap, peer, v6=False, vlan=0x0064, compiled=compiled)


@COMPILED
def test_tso_ipv6_segmented_by_kernel(wire: tuple[TapBackend, int, str], compiled: bool) -> None:
    tap, peer, _ = wire
    _tso_through_kernel(tap, peer, v6=True, compiled=compiled)


@COMPILED
def test_checksum_offload_finished_by_kernel(wire: tuple[TapBackend, int, str],
                                             compiled: bool) -> None:
    tap, peer, _ = wire
    guest = Guest()
    try:
        stats = VfStats()
        q = TxQueue(lambda: guest.memory, tap, stats, fast=_compiled_tx(tap, compiled))
        ring = guest.alloc(16 * 16)
        enable_tx(q, ring, 16)
        frames = [ipv4_udp(payload_bytes(700)), ipv4_fixed(ipv4_tcp(payload_bytes(900)))]
        slot = 0
        for f, l4t in zip(frames, (d.TUCMD_L4T_UDP, d.TUCMD_L4T_TCP), strict=True):
            buf = guest.alloc(len(f))
            guest.write(buf, f)
            guest.write(ring + slot * 16,
                        TxContextDesc.build(14, 20, d.TUCMD_IPV4 | l4t).pack())
            guest.write(ring + slot * 16 + 16,
                        TxDataDesc.build(buf, len(f), popts=d.TXD_POPTS_TXSM).pack())
            slot += 2
        q.tail = slot
        assert q.doorbell() == 2
        got = read_frames(peer, 2, b"\x08\x00")
        assert len(got) == 2
        assert all(l4_ok(g, 14) for g in got)
        assert [len(g) for g in got] == [len(f) for f in frames]
        assert stats.tx_csum_frames == 2 and stats.gptc == 2
        assert q.fast is None or q.fast.packets == 2
    finally:
        guest.close()


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_rx_from_tap_into_guest(wire: tuple[TapBackend, int, str], compiled: bool) -> None:
    """The Python loop and the compiled one (fastlane/rx.c) deliver and drop alike;
    the compiled one also reports the checksum offload bits."""
    if compiled and not fastlane.available():
        pytest.skip(f"fast lane: {fastlane.unavailable_reason()}")
    tap, peer, _ = wire
    guest = Guest()
    try:
        stats = VfStats()
        fd = tap.fileno()
        assert fd is not None
        q = RxQueue(lambda: guest.memory, tap, stats,
                    checksum=fastlane.rx_checksum() if compiled else None,
                    fast=TapRx(fd, None) if compiled else None)
        ring = guest.alloc(8 * 16)
        enable_rx(q, ring, 8)
        q.max_frame = 1000
        bufs = [guest.alloc(2048) for _ in range(8)]
        for i, b in enumerate(bufs):
            guest.write(ring + i * 16, RxReadDesc(b).pack())
        q.tail = 7
        poller = select.poll()
        poller.register(tap.fileno() or -1, select.POLLIN)
        big = ipv4_fixed(ipv4_udp(payload_bytes(1200 - 42)))   # > max_frame: truncated
        exact = ipv4_fixed(ipv4_udp(payload_bytes(1000 - 42)))  # == buffer: fits
        small = ipv4_fixed(ipv4_udp(payload_bytes(100)))
        for f in (big, exact, small):
            os.write(peer, f)
        got: list[tuple[int, bytes]] = []
        while len(got) < 2 and poller.poll(3000):
            before = q.head
            q.poll()
            for i in range(before, q.head):
                wb = RxWritebackDesc.unpack(guest.read(ring + i * 16, 16))
                assert wb.status_error & 0x3 == d.RXD_STAT_DD | d.RXD_STAT_EOP
                data = guest.read(bufs[i], wb.length)
                if data[6:14] == SRC_MAC + b"\x08\x00":  # ours (the kernel sends IPv6 ND too)
                    # These frames carry only the pseudo-header seed in the UDP
                    # checksum (an offload builder's frame): the check flags it.
                    offload = (d.RXD_STAT_IPCS | d.RXD_STAT_UDPCS | d.RXD_ERR_TCPE
                               if compiled else 0)
                    assert wb.status_error == d.RXD_STAT_DD | d.RXD_STAT_EOP | offload
                    got.append((i, data))
        assert [g[1] for g in got] == [exact, small]
        assert stats.drops.get("rx_oversize") == 1
        assert stats.gprc >= 2 and (stats.rx_csum_errors >= 2) == compiled
    finally:
        guest.close()


def test_tap_lifecycle(netns: str) -> None:
    with inside(netns):
        tap = TapBackend("vtnew", mtu=1400)
        assert tap.created and interface_exists("vtnew")
        out = subprocess.run(["ip", "-o", "link", "show", "vtnew"], capture_output=True,
                             text=True, check=True).stdout
        assert "mtu 1400" in out and ",UP" in out
        tap.close()
        assert not interface_exists("vtnew")  # not persistent: gone with the fd
        ip("tuntap", "add", "mode", "tap", "name", "vtkeep")
        tap = TapBackend("vtkeep")
        assert not tap.created
        tap.close()
        assert interface_exists("vtkeep")  # someone else's persistent tap stays


def test_tap_send_after_close_is_counted(netns: str) -> None:
    with inside(netns):
        tap = TapBackend("vtc")
    tap.close()
    tap.send(bytes(10), [b"x" * 60])
    assert tap.errors == {"tx_closed": 1}
    assert tap.recv_into(bytearray(10), memoryview(bytearray(100))) is None

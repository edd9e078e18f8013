"""A Linux tap device with virtio-net headers, as the NIC's wire.

Set-up (reference/igbvf.md §8.4): ``TUNSETIFF`` with IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR, ``TUNSETVNETHDRSZ`` 10, ``TUNSETOFFLOAD`` 0, non-blocking, link up.

* Writes may carry GSO super-frames and partial checksums: tun accepts them whatever
  TUNSETOFFLOAD says, and the kernel segments/finishes them.
* TUNSETOFFLOAD stays 0, so reads give only frames up to the MTU with complete
  checksums (gso_type NONE): never more than the guest's one-buffer receive buffer.
* A tap this backend creates is not persistent and disappears on ``close()``; an
  existing (persistent) tap is attached to and left as it was.
* tun truncates a frame larger than the read buffer and returns only the bytes
  copied; ``recv_into`` reads one extra scratch byte to tell "fits exactly" from
  "truncated", and reports a truncated frame as ``len(buf) + 1``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections import Counter
from collections.abc import Sequence

from vmsi_server.nic.backend.base import BytesLike
from vmsi_server.nic.offload import VNET_HDR_LEN

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFINDEX = 0x8933
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFNAMSIZ = 16

_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")
_DROP_ERRNOS = {errno.EAGAIN: "eagain", errno.ENOBUFS: "enobufs"}


def _ifreq_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise ValueError(f"bad interface name {name!r}")
    return raw


def interface_exists(name: str) -> bool:
    """Whether ``name`` exists in this thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s, SIOCGIFINDEX, _IFREQ_INT.pack(_ifreq_name(name), 0))
        except OSError:
            return False
    return True


def set_link(name: str, up: bool = True, mtu: int | None = None) -> None:
    """Bring ``name`` up (or down) and optionally set its MTU, by ioctl."""
    raw = _ifreq_name(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if mtu is not None:
            fcntl.ioctl(s, SIOCSIFMTU, _IFREQ_INT.pack(raw, mtu))
        got = fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0))
        flags = _IFREQ_FLAGS.unpack(got)[1]
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, flags))


class TapBackend:
    """Open (or create) the tap ``name`` in the current network namespace."""

    vnet_hdr = True

    def __init__(self, name: str, mtu: int | None = None, link_up: bool = True) -> None:
        raw = _ifreq_name(name)
        self.errors: Counter[str] = Counter()
        self.created = not interface_exists(name)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            got = fcntl.ioctl(fd, TUNSETIFF,
                              _IFREQ_FLAGS.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            self.name = _IFREQ_FLAGS.unpack(got)[0].rstrip(b"\0").decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            os.set_blocking(fd, False)
            if link_up or mtu is not None:
                set_link(self.name, up=link_up, mtu=mtu)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._scratch = bytearray(1)

    def fileno(self) -> int | None:
        return self._fd

    def send(self, vnet_hdr: bytes, parts: Sequence[BytesLike]) -> None:
        fd = self._fd
        if fd is None:
            self.errors["tx_closed"] += 1
            return
        try:
            os.writev(fd, [vnet_hdr, *parts])
        except OSError as e:
            self.errors["tx_" + _DROP_ERRNOS.get(e.errno or 0, f"errno_{e.errno}")] += 1

    def recv_into(self, vnet_hdr_buf: bytearray | memoryview, buf: memoryview) -> int | None:
        fd = self._fd
        if fd is None:
            return None
        try:
            n = os.readv(fd, [vnet_hdr_buf, buf, self._scratch])
        except OSError as e:
            if e.errno != errno.EAGAIN:
                self.errors[f"rx_errno_{e.errno}"] += 1
            return None
        if n < VNET_HDR_LEN:
            self.errors["rx_short"] += 1
            return None
        return n - VNET_HDR_LEN

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

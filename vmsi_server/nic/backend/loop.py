"""In-process backend for tests and benchmarks.

TX frames land in ``sent`` after the offloads are applied (by the TX queue when
``vnet_hdr`` is false, or here, in software, from the vnet header when it is true;
``sent_vnet`` then keeps the raw header + frame pairs). ``inject()`` queues frames for
RX; ``fileno()`` is an eventfd that stays readable while frames are queued, so the
backend fits a level-triggered event loop.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import suppress

from vmsi_server.nic.backend.base import BytesLike
from vmsi_server.nic.offload import ZERO_VNET_HDR, OffloadError, VnetHdr, apply_vnet_hdr


class LoopBackend:
    def __init__(self, vnet_hdr: bool = False, keep: bool = True) -> None:
        self.vnet_hdr = vnet_hdr
        self.keep = keep
        """False: count frames without keeping them (benchmarks)."""
        self.errors: Counter[str] = Counter()
        self.sent: list[bytes] = []
        self.sent_vnet: list[tuple[bytes, bytes]] = []
        self.sent_count = 0
        self._rx: deque[tuple[bytes, bytes]] = deque()
        self._efd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int | None:
        return self._efd

    # -- TX ---------------------------------------------------------------
    def send(self, vnet_hdr: bytes, parts: Sequence[BytesLike]) -> None:
        self.sent_count += 1
        if not self.keep:
            return
        frame = b"".join(parts)
        if not self.vnet_hdr:
            self.sent.append(frame)
            return
        self.sent_vnet.append((bytes(vnet_hdr), frame))
        try:
            segments = apply_vnet_hdr(VnetHdr.unpack(vnet_hdr), frame)
        except OffloadError:
            self.errors["tx_bad_vnet_hdr"] += 1
            return
        self.sent.extend(bytes(s) for s in segments)

    # -- RX ---------------------------------------------------------------
    def inject(self, frame: bytes, vnet_hdr: bytes = ZERO_VNET_HDR) -> None:
        """Queue ``frame`` for RX (``vnet_hdr`` is handed out when ``self.vnet_hdr``)."""
        if not self._rx and self._efd is not None:
            os.eventfd_write(self._efd, 1)
        self._rx.append((vnet_hdr, bytes(frame)))

    @property
    def pending(self) -> int:
        return len(self._rx)

    def recv_into(self, vnet_hdr_buf: bytearray | memoryview, buf: memoryview) -> int | None:
        if not self._rx:
            return None
        hdr, frame = self._rx.popleft()
        if not self._rx and self._efd is not None:
            with suppress(BlockingIOError):
                os.eventfd_read(self._efd)
        if self.vnet_hdr:
            vnet_hdr_buf[:len(hdr)] = hdr
        n = min(len(frame), len(buf))
        buf[:n] = frame[:n]
        return len(frame)

    def close(self) -> None:
        if self._efd is not None:
            os.close(self._efd)
            self._efd = None
        self._rx.clear()


"""The packet backend interface the TX and RX queues talk to.

A backend moves whole Ethernet frames (no FCS). With ``vnet_hdr`` true every frame
travels with a 10-byte ``virtio_net_hdr`` (see :mod:`vmsi_server.nic.offload`) and the
backend (the kernel, for a tap) performs the offloads it describes; with ``vnet_hdr``
false the TX queue finishes offloads in software and passes an empty header.

Backends never raise on the data path: failures are counted in ``errors`` (reason ->
count) and the frame is dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

BytesLike = bytes | bytearray | memoryview


class PacketBackend(Protocol):
    vnet_hdr: bool
    """Whether send()/recv_into() carry a virtio-net header."""
    errors: Counter[str]
    """Data-path failures by reason, e.g. ``"tx_eagain"``."""

    def fileno(self) -> int | None:
        """An fd that polls readable while recv_into() has a frame (level-triggered),
        or None if the backend cannot be watched."""
        ...

    def send(self, vnet_hdr: bytes, parts: Sequence[BytesLike]) -> None:
        """Send one frame made of ``parts`` (gathered, not copied where possible)."""
        ...

    def recv_into(self, vnet_hdr_buf: bytearray | memoryview, buf: memoryview) -> int | None:
        """Receive one frame into ``buf`` (and its header into ``vnet_hdr_buf`` when
        ``vnet_hdr``). Returns the frame length without the header, or None when
        nothing is available. A result larger than ``len(buf)`` means the frame did not
        fit: ``buf`` holds a truncated copy and the frame is consumed."""
        ...

    def close(self) -> None: ...

"""A blocking vfio-user client: what tests, benchmarks and the replay tool use.

It speaks through the same sans-io ``ClientConnection`` as the rest of the
project checks replies with (the way QEMU checks them), over a plain blocking
socket. Guest memory is a memfd mapped on both sides, as QEMU's
``memory-backend-memfd,share=on`` gives it; interrupts arrive on real
eventfds the client creates and installs with SET_IRQS.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from vmsi_server.protocol import messages as m
from vmsi_server.protocol.capabilities import QEMU_CAPABILITIES, Capabilities
from vmsi_server.protocol.connection import ClientConnection
from vmsi_server.protocol.constants import (
    DEVICE_INFO_ARGSZ,
    DMA_MAP_ARGSZ,
    DMA_UNMAP_ARGSZ,
    IRQ_INFO_ARGSZ,
    REGION_INFO_ARGSZ,
    SET_IRQS_ARGSZ,
    DmaMapFlags,
    DmaUnmapFlags,
    IrqIndex,
    SetIrqsFlags,
)
from vmsi_server.protocol.events import ConnectionClosed, ReplyReceived
from vmsi_server.transport.channel import Channel, ChannelClosed

R = TypeVar("R", bound=m.Message)


class ServerError(Exception):
    """The server answered with an error reply."""

    def __init__(self, err: int, request: m.Message) -> None:
        super().__init__(f"{type(request).__name__} failed: {os.strerror(err)} ({err})")
        self.errno = err
        self.request = request


@dataclass
class GuestRam:
    """A memfd standing in for guest RAM: the client's view of what it maps."""

    fd: int
    size: int
    iova: int
    mem: mmap.mmap

    def read(self, iova: int, length: int) -> bytes:
        start = iova - self.iova
        return bytes(self.mem[start : start + length])

    def write(self, iova: int, data: bytes) -> None:
        start = iova - self.iova
        self.mem[start : start + len(data)] = data

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class VfioUserClient:
    """Connect, negotiate, then one method per request kind."""

    def __init__(
        self,
        path: str,
        *,
        capabilities: Capabilities = QEMU_CAPABILITIES,
        timeout: float = 5.0,
        connect: bool = True,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.conn = ClientConnection(capabilities)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.channel = Channel(sock, read_size=1 << 21)
        self._rams: list[GuestRam] = []
        if connect:
            try:
                self.negotiate()
            except BaseException:
                self.close()  # a refused or silent server must not leak the socket
                raise

    # -- plumbing -----------------------------------------------------
    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for ram in self._rams:
            ram.close()
        self._rams.clear()
        self.conn.close()
        self.channel.close()

    def fileno(self) -> int:
        return self.channel.fileno()

    def send(self, message: m.Message, fds: Sequence[int] = (), *, posted: bool = False) -> int:
        data, own_fds, msg_id = self.conn.request(message, no_reply=posted)
        self.channel.send(data, list(fds) or own_fds)
        return msg_id

    def receive_reply(self, msg_id: int) -> ReplyReceived:
        """Block until the reply to ``msg_id`` (other events are dropped)."""
        while True:
            event = self.conn.next_event()
            while event is not None:
                if isinstance(event, ReplyReceived) and event.header.msg_id == msg_id:
                    return event
                if isinstance(event, ConnectionClosed):
                    raise ChannelClosed(event.reason)
                event = self.conn.next_event()
            ready, _, _ = select.select([self.channel.fileno()], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"no reply to message {msg_id} within {self.timeout}s")
            try:
                data, fds = self.channel.receive()
            except ChannelClosed:
                self.conn.receive_data(b"")
                raise
            self.conn.receive_data(data, fds)

    def call(self, message: m.Message, reply_type: type[R], fds: Sequence[int] = ()) -> R:
        event = self.receive_reply(self.send(message, fds))
        if event.errno:
            raise ServerError(event.errno, message)
        reply = event.message
        assert isinstance(reply, reply_type), f"unexpected reply {reply!r}"
        return reply

    # -- requests -----------------------------------------------------
    def negotiate(self) -> m.VersionReply:
        return self.call(self.conn.version_request(), m.VersionReply)

    def device_info(self) -> m.DeviceGetInfoReply:
        return self.call(m.DeviceGetInfoRequest(DEVICE_INFO_ARGSZ), m.DeviceGetInfoReply)

    def region_info(self, index: int, argsz: int = REGION_INFO_ARGSZ) -> m.RegionInfoReply:
        return self.call(m.RegionInfoRequest(argsz, 0, index), m.RegionInfoReply)

    def irq_info(self, index: int) -> m.IrqInfoReply:
        return self.call(m.IrqInfoRequest(IRQ_INFO_ARGSZ, 0, index), m.IrqInfoReply)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(m.RegionReadRequest(offset, region, count), m.RegionReadReply)
        return bytes(reply.data)

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        message = m.RegionWriteRequest(offset, region, len(data), data)
        if posted:
            self.send(message, posted=True)
        else:
            self.call(message, m.RegionWriteReply)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.region_read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int, *, posted: bool = False) -> None:
        self.region_write(region, offset, value.to_bytes(4, "little"), posted=posted)

    def dma_map(
        self, iova: int, size: int, fd: int | None = None, offset: int = 0,
        flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
    ) -> None:
        message = m.DmaMapRequest(DMA_MAP_ARGSZ, flags, offset, iova, size, fd)
        self.call(message, m.DmaMapReply, (fd,) if fd is not None else ())

    def dma_unmap(self, iova: int, size: int, *, unmap_all: bool = False) -> None:
        flags = DmaUnmapFlags.UNMAP_ALL if unmap_all else 0
        message = m.DmaUnmapRequest(DMA_UNMAP_ARGSZ, int(flags), 0 if unmap_all else iova,
                                    0 if unmap_all else size)
        self.call(message, m.DmaUnmapReply)

    def set_irqs(
        self, index: int, flags: int, start: int, count: int,
        fds: Sequence[int] = (), bools: Sequence[bool] | None = None,
    ) -> None:
        message = m.SetIrqsRequest(
            SET_IRQS_ARGSZ + (len(bools) if bools is not None else 0), flags, index, start,
            count, tuple(fds), tuple(bools) if bools is not None else None,
        )
        self.call(message, m.SetIrqsReply, fds)

    def reset(self) -> None:
        self.call(m.DeviceResetRequest(), m.DeviceResetReply)

    # -- conveniences -------------------------------------------------
    def map_ram(self, iova: int, size: int, *, offset: int = 0) -> GuestRam:
        """Create a memfd, map it here and DMA_MAP it to the server (which gets a dup)."""
        fd = os.memfd_create("vmsi-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, offset + size)
        mem = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        ram = GuestRam(fd, size, iova - offset, mem)
        try:
            self.dma_map(iova, size, fd, offset)
        except BaseException:
            ram.close()
            raise
        self._rams.append(ram)
        return ram

    def install_msix_eventfds(self, count: int, start: int = 0) -> list[int]:
        """Fresh non-blocking eventfds for MSI-X vectors ``start..``; the caller reads them."""
        fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.set_irqs(IrqIndex.MSIX, SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER,
                      start, count, fds)
        return fds


def read_eventfd(fd: int) -> int:
    """The count an eventfd accumulated (0 when nothing fired)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


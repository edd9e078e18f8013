"""One client connection: typed requests in, device calls, replies out.

The session is where the protocol meets the device. It owns what belongs to
the client (its DMA mappings and IRQ eventfds, both dropped when the client
goes) and checks what needs the device's shape (region and IRQ indexes,
bounds); the ``PciFunction`` does the rest. Every failure becomes an error
reply with an errno, or, for posted messages, a counted and logged failure;
the session never lets an exception out into the loop.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from vmsi_server.dma.errors import DmaError
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.lane import SessionLane
from vmsi_server.pci.function import (
    AccessError,
    IrqRequest,
    PciFunction,
    apply_irq_eventfds,
    validate_irq_request,
)
from vmsi_server.pci.irq_lines import IrqLines, is_eventfd
from vmsi_server.pci.windows import MaskWindow, ReadWindow, RegisterRule
from vmsi_server.protocol import messages as m
from vmsi_server.protocol.capabilities import ServerLimits
from vmsi_server.protocol.connection import (
    REGION_READ_REQUEST_SIZE,
    PostedWrite,
    ServerConnection,
)
from vmsi_server.protocol.constants import (
    DEVICE_INFO_ARGSZ,
    IRQ_INFO_ARGSZ,
    REGION_INFO_ARGSZ,
    Command,
    DmaUnmapFlags,
    HeaderFlags,
    RegionCapabilityId,
    RegionInfoFlags,
    SetIrqsFlags,
)
from vmsi_server.protocol.errors import ProtocolError
from vmsi_server.protocol.events import (
    BadRequest,
    ConnectionClosed,
    Event,
    ReplyReceived,
    Request,
    UnexpectedReply,
    VersionNegotiated,
)
from vmsi_server.protocol.fds import close_fds
from vmsi_server.protocol.header import Header
from vmsi_server.telemetry.logsetup import debug_enabled
from vmsi_server.telemetry.messages import MessageCounters
from vmsi_server.transport.channel import Channel, ChannelClosed
from vmsi_server.transport.loop import EventLoop

log = structlog.get_logger("vmsi.session")

W = TypeVar("W", ReadWindow, MaskWindow, RegisterRule)

_now_ns = time.perf_counter_ns
_REGION_READ = int(Command.REGION_READ)  # counters are keyed by the header's plain int
_REGION_WRITE = int(Command.REGION_WRITE)
_NO_REPLY = int(HeaderFlags.NO_REPLY)

POSTED_FAILURES_LOGGED = 10
"""Posted (unanswerable) failures logged per session before the log thins out."""

SPARSE_MMAP_HEADER = 16
"""Capability header (id u16, version u16, next u32) plus nr_areas u32 and a reserved u32."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What the server advertises in VERSION and then enforces."""

    max_msg_fds: int = 8
    max_data_xfer_size: int = 1 << 20
    max_dma_maps: int = 65535
    pgsizes: int = 4096
    write_multiple: bool = True

    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            max_msg_fds=self.max_msg_fds,
            max_data_xfer_size=self.max_data_xfer_size,
            max_dma_maps=self.max_dma_maps,
            pgsizes=self.pgsizes,
            write_multiple=self.write_multiple,
        )


class Session:
    """Serves one PciFunction to one connected client."""

    def __init__(
        self,
        sock: socket.socket,
        function: PciFunction,
        loop: EventLoop,
        limits: SessionLimits | None = None,
        counters: MessageCounters | None = None,
        on_closed: Callable[[], None] | None = None,
        name: str = "device",
    ) -> None:
        self.name = name
        self.function = function
        self.limits = limits or SessionLimits()
        self.counters = counters if counters is not None else MessageCounters()
        self._loop = loop
        self._channel = Channel(sock)
        self._conn = ServerConnection(self.limits.server_limits())
        self._events = self._conn.pending_events
        self._memory = GuestMemory(max_maps=self.limits.max_dma_maps)
        self._irqs = IrqLines([spec.count for spec in function.irq_specs])
        self._on_closed = on_closed
        self._closed = False
        self._posted_failures = 0
        self._debug = debug_enabled()
        self._region_sizes = tuple(spec.size for spec in function.regions)
        """Region sizes for the bounds check of every access (a function's regions are
        fixed: they are what GET_REGION_INFO told the client)."""
        self._lane: SessionLane | None = None
        """The compiled lane serving this connection while the loop has one."""
        self._handlers: dict[type[m.Message], Callable[[Header, m.Message], None]] = {
            m.DmaMapRequest: self._dma_map,
            m.DmaUnmapRequest: self._dma_unmap,
            m.DeviceGetInfoRequest: self._device_info,
            m.RegionInfoRequest: self._region_info,
            m.RegionIoFdsRequest: self._region_io_fds,
            m.IrqInfoRequest: self._irq_info,
            m.SetIrqsRequest: self._set_irqs,
            m.RegionReadRequest: self._region_read,
            m.RegionWriteRequest: self._region_write,
            m.DeviceResetRequest: self._device_reset,
            m.RegionWriteMultiRequest: self._region_write_multi,
        }

    # -- FunctionHost -------------------------------------------------
    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def irqs(self) -> IrqLines:
        return self._irqs

    @property
    def loop(self) -> EventLoop:
        return self._loop

    # -- lifecycle ----------------------------------------------------
    def start(self) -> None:
        self.function.attach(self)
        fd = self._channel.fileno()
        self._loop.add_reader(fd, self._on_readable)
        lanes = self._loop.lanes
        if lanes is not None:
            self._lane = SessionLane(fd, self, self.counters, self._read_windows(),
                                     self.function.access_counters,
                                     self._in_regions(self.function.mask_windows()),
                                     self._in_regions(self.function.register_rules()),
                                     hot_path=self.function.hot_path)
            lanes.add(self._lane)
        log.info("session.connected", device=self.name, fast_lane=self._lane is not None)

    def _read_windows(self) -> list[ReadWindow]:
        return self._in_regions(self.function.read_windows())

    def _in_regions(self, windows: Sequence[W]) -> list[W]:
        """The windows that lie inside their region: the lane never serves an access
        the general path's bounds check would refuse."""
        sizes = self._region_sizes
        out = []
        for window in windows:
            if window.region < len(sizes) and window.start + window.length <= sizes[window.region]:
                out.append(window)
            else:
                log.warning("session.window_outside_region", device=self.name,
                            region=window.region, start=window.start, length=window.length)
        return out

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._channel.fileno())
        if self._lane is not None:
            self._lane.close()
        try:
            self.function.detach()
        except Exception:
            # A device bug must not leave the endpoint "busy" for good.
            log.exception("session.detach_failed", device=self.name)
        self._irqs.close_all()
        self._memory.close()
        self._conn.close()
        self._channel.close()
        log.info(
            "session.closed",
            device=self.name,
            reason=reason,
            messages=self.counters.total(),
            suppressed_errors=self._conn.suppressed_errors,
        )
        if self._on_closed is not None:
            self._on_closed()

    def drain(self) -> None:
        """Handle whatever the client already sent (or its EOF), without blocking."""
        poller = select.poll()
        poller.register(self._channel.fileno(), select.POLLIN)
        while not self._closed and poller.poll(0):
            self._on_readable()

    @property
    def closed(self) -> bool:
        return self._closed

    def lane_stats(self) -> dict[str, int] | None:
        """What the compiled lane did for this connection (None without one)."""
        lane = self._lane
        if lane is None:
            return None
        return {
            "served_reads": lane.served_reads,
            "applied_writes": lane.applied_writes,
            "posted_to_python": lane.posted_writes,
            "device_writes": lane.device_writes,
        }

    # -- input --------------------------------------------------------
    def _on_readable(self) -> None:
        """One read: feed it to the connection and serve every event it yields.

        The top of every round trip. A read holding exactly one synchronous
        REGION_READ (how QEMU sends every guest MMIO/config read) is answered in
        :meth:`_serve_read` without building events; anything else goes through
        the connection, requests first and by exact type, the rest through
        :meth:`_other_event`.
        """
        lane = self._lane
        left = lane.take() if lane is not None else None
        if left is not None:
            data, fds, ended = left
            if ended is not None:
                close_fds(fds)
                self.close(f"client disconnected: {ended}")
                return
        else:
            try:
                data, fds = self._channel.receive()
            except ChannelClosed as exc:
                self.close(f"client disconnected: {exc}")
                return
        if not data:
            return
        try:
            self._receive(data, fds)
        finally:
            if lane is not None and not self._closed:
                self._sync_lane(lane)

    def _sync_lane(self, lane: SessionLane) -> None:
        """Let the lane read the socket only when that cannot reorder anything:
        after VERSION, with no partial message waiting in the protocol layer."""
        conn = self._conn
        if conn.ready and not conn.buffered:
            lane.enable(conn.max_xfer)
        else:
            lane.disable()

    def _receive(self, data: bytes, fds: tuple[int, ...]) -> None:
        read = self._conn.peek_region_read(data, fds)
        if read is not None and self._serve_read(*read):
            return
        writes = self._conn.peek_posted_writes(data, fds)
        if writes is not None and self._serve_posted_writes(writes):
            return
        self._conn.receive_data(data, fds)
        events = self._events
        while events and not self._closed:
            event = events.popleft()
            if type(event) is Request:
                self._dispatch(event.header, event.message)
            else:
                self._other_event(event)

    def _other_event(self, event: Event) -> None:
        if isinstance(event, BadRequest):
            self._bad_request(event)
        elif isinstance(event, VersionNegotiated):
            self._version(event)
        elif isinstance(event, ReplyReceived):
            close_fds(event.fds)
        elif isinstance(event, UnexpectedReply):
            self.counters.error(event.header.command)
            log.warning("session.unexpected_reply", device=self.name, reason=event.reason)
        elif isinstance(event, ConnectionClosed):
            self.close(event.reason)

    def _bad_request(self, event: BadRequest) -> None:
        self.counters.error(event.header.command)
        log.warning(
            "session.bad_request",
            device=self.name,
            command=event.header.command,
            errno=event.errno,
            reason=event.reason,
        )
        self._send(self._conn.error_reply(event.header, event.errno))
        if event.fatal:
            self.close(f"protocol error: {event.reason}")

    def _dispatch(self, header: Header, message: m.Message) -> None:
        """Run the handler for ``message``; turn its failures into error replies.

        The service time (``counters.record``) is taken around the handler, so it
        includes building the reply and handing it to the socket.
        """
        start = _now_ns()
        try:
            self._handlers[type(message)](header, message)
        except Exception as exc:
            if not self._handler_failed(header, exc):
                return
        self.counters.record(header.command, _now_ns() - start)

    def _handler_failed(self, header: Header, exc: Exception) -> bool:
        """Answer the request a handler raised on (call it inside the ``except``);
        False when the client is gone (the session is then closed)."""
        if isinstance(exc, (ProtocolError, AccessError, DmaError)):
            self._fail(header, exc.errno, str(exc))
        elif isinstance(exc, ChannelClosed):
            self.close(f"client disconnected: {exc}")
            return False
        else:  # a device bug must not take the server down
            log.exception("session.handler_crashed", device=self.name, command=header.command)
            self._fail(header, errno.EIO, f"internal error: {exc!r}")
        return True

    def lane_posted_write(self, msg_id: int, region: int, offset: int, data: bytes) -> bool:
        """A posted REGION_WRITE the lane read (``SessionLane``'s callback). Applied by
        :meth:`_apply_posted`, bounds check included (an out-of-bounds one is counted
        and logged as the general path does). True when the session closed."""
        return not self._apply_posted(msg_id, offset, region, memoryview(data), checked=False)

    def _serve_posted_writes(self, writes: list[PostedWrite]) -> bool:
        """The posted REGION_WRITE lane (see ``ServerConnection.peek_posted_writes``).

        Doorbells (TDT per packet, RDT per 16 buffers, EIMS per interrupt) are the
        bulk of a NIC's traffic and need no answer: apply them in order from plain
        values. If any is out of bounds nothing is done here (returns False) and
        the general path handles the whole read, logging and counting the bad
        one as it always does.
        """
        sizes = self._region_sizes
        for _msg_id, offset, region, data in writes:
            if region >= len(sizes) or offset + len(data) > sizes[region]:
                return False
        apply = self._apply_posted
        for msg_id, offset, region, data in writes:
            if not apply(msg_id, offset, region, data, checked=True):
                break
        return True

    def _apply_posted(self, msg_id: int, offset: int, region: int, data: memoryview, *,
                      checked: bool) -> bool:
        """One posted REGION_WRITE, as ``_dispatch`` + ``_region_write`` would do it: a
        device failure is counted and logged (no reply: it is posted), and the service
        time is recorded either way. False when the client is gone."""
        start = _now_ns()
        try:
            if not checked:
                self._check_access(region, offset, len(data))
            if data:
                self.function.write(region, offset, data)
        except Exception as exc:
            header = Header(msg_id, _REGION_WRITE, REGION_READ_REQUEST_SIZE + len(data), _NO_REPLY)
            if not self._handler_failed(header, exc):
                return False
        self.counters.record(_REGION_WRITE, _now_ns() - start)
        return not self._closed

    def _serve_read(self, msg_id: int, offset: int, region: int, count: int) -> bool:
        """The REGION_READ fast lane (see ``ServerConnection.peek_region_read``).

        Does what ``_dispatch`` + ``_region_read`` do for a read the connection has
        already validated, from plain ints: bounds check, device read, reply, service
        time. A read out of bounds is left to the general path (returns False before
        doing anything), which answers it with the usual error and log line; a device
        failure is answered here exactly as ``_dispatch`` would.
        """
        sizes = self._region_sizes
        if region >= len(sizes) or offset + count > sizes[region]:
            return False
        start = _now_ns()
        try:
            data = self.function.read(region, offset, count) if count else b""
            self._channel.send(self._conn.region_read_reply(msg_id, offset, region, count, data))
        except Exception as exc:
            header = Header(msg_id, _REGION_READ, REGION_READ_REQUEST_SIZE)
            if not self._handler_failed(header, exc):
                return True
        self.counters.record(_REGION_READ, _now_ns() - start)
        return True

    def _fail(self, header: Header, err: int, reason: str) -> None:
        self.counters.error(header.command)
        if header.no_reply:
            # A guest can post bad writes in a loop: every one is counted, but
            # only the first few and then one in a thousand reach the log.
            self._posted_failures += 1
            n = self._posted_failures
            if self._debug or n <= POSTED_FAILURES_LOGGED or n % 1000 == 0:
                log.warning(
                    "session.posted_failed", device=self.name, command=header.command,
                    errno=err, reason=reason, failures=n,
                )
        elif self._debug or header.command != Command.REGION_READ:
            log.info(
                "session.request_failed", device=self.name, command=header.command,
                errno=err, reason=reason,
            )
        self._send(self._conn.error_reply(header, err))

    def _reply(self, header: Header, reply: m.Message, fds: tuple[int, ...] = ()) -> None:
        data, send_fds = self._conn.reply(header, reply, fds)
        if data:
            self._channel.send(data, send_fds)

    def _send(self, data: bytes) -> None:
        if data:
            try:
                self._channel.send(data)
            except ChannelClosed as exc:
                self.close(f"client disconnected: {exc}")

    # -- handlers -----------------------------------------------------
    def _version(self, event: VersionNegotiated) -> None:
        self.counters.record(event.header.command, 0)
        log.info(
            "session.version",
            device=self.name,
            client=event.request.capabilities,
            reply=event.reply.capabilities,
        )
        self._reply(event.header, event.reply)

    def _dma_map(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.DmaMapRequest)
        self._memory.add(msg.address, msg.size, msg.fd, msg.offset, msg.flags)
        if self._debug:
            log.debug("session.dma_map", device=self.name, iova=hex(msg.address),
                      size=msg.size, fd=msg.fd is not None)
        self._reply(header, m.DmaMapReply())

    def _dma_unmap(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.DmaUnmapRequest)
        if msg.flags & DmaUnmapFlags.UNMAP_ALL:
            self._memory.remove_all()
        else:
            self._memory.remove(msg.address, msg.size)
        self._reply(header, m.DmaUnmapReply(msg.argsz, msg.flags, msg.address, msg.size))

    def _device_info(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.DeviceGetInfoRequest)
        function = self.function
        self._reply(
            header,
            m.DeviceGetInfoReply(
                DEVICE_INFO_ARGSZ,
                int(function.device_flags),
                len(function.regions),
                len(function.irq_specs),
            ),
        )

    def _region_info(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.RegionInfoRequest)
        regions = self.function.regions
        if msg.index >= len(regions):
            raise AccessError(errno.EINVAL, f"region index {msg.index} out of range")
        spec = regions[msg.index]
        flags = int(spec.flags) if spec.present else 0
        caps = b""
        fd: int | None = None
        if spec.present and spec.mmap_areas:
            fd = self.function.region_fd(msg.index)
            if fd is not None:
                flags |= RegionInfoFlags.MMAP
                caps = _sparse_mmap_capability(spec.mmap_areas)
                flags |= RegionInfoFlags.CAPS
        needed = REGION_INFO_ARGSZ + len(caps)
        cap_offset = REGION_INFO_ARGSZ if caps else 0
        if msg.argsz < needed:
            # QEMU asks again with the argsz we return; never send more than asked.
            reply = m.RegionInfoReply(needed, flags, msg.index, 0, spec.size, 0)
            self._reply(header, reply)
            return
        reply = m.RegionInfoReply(needed, flags, msg.index, cap_offset, spec.size, 0, caps)
        self._reply(header, reply, (fd,) if fd is not None else ())

    def _region_io_fds(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.RegionIoFdsRequest)
        if msg.index >= len(self.function.regions):
            raise AccessError(errno.EINVAL, f"region index {msg.index} out of range")
        # No ioeventfds: every access comes over the socket, in order.
        self._reply(header, m.RegionIoFdsReply(msg.argsz, 0, msg.index, 0))

    def _irq_info(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.IrqInfoRequest)
        specs = self.function.irq_specs
        if msg.index >= len(specs):
            raise AccessError(errno.EINVAL, f"IRQ index {msg.index} out of range")
        spec = specs[msg.index]
        self._reply(header, m.IrqInfoReply(IRQ_INFO_ARGSZ, int(spec.flags), msg.index, spec.count))

    def _set_irqs(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.SetIrqsRequest)
        request = IrqRequest(
            msg.index, SetIrqsFlags(msg.flags), msg.start, msg.count, msg.fds, msg.bools
        )
        try:
            validate_irq_request(self.function.irq_specs, request)
            if not all(is_eventfd(fd) for fd in msg.fds):
                raise AccessError(errno.EINVAL, "SET_IRQS fds must be eventfds")
        except AccessError:
            close_fds(msg.fds)
            raise
        applied = apply_irq_eventfds(self._irqs, request)
        self.function.set_irqs(applied)
        self._reply(header, m.SetIrqsReply())

    def _check_access(self, region: int, offset: int, count: int) -> None:
        sizes = self._region_sizes
        if region >= len(sizes):
            raise AccessError(errno.EINVAL, f"region index {region} out of range")
        size = sizes[region]
        if offset + count > size:
            raise AccessError(
                errno.EINVAL, f"access {offset:#x}+{count} beyond region {region} ({size:#x})"
            )

    def _region_read(self, header: Header, msg: m.Message) -> None:
        """REGION_READs the fast lane (``_serve_read``) left: posted or pipelined reads,
        and the ones out of bounds (answered with an error)."""
        assert isinstance(msg, m.RegionReadRequest)
        self._check_access(msg.region, msg.offset, msg.count)
        data = self.function.read(msg.region, msg.offset, msg.count) if msg.count else b""
        self._reply(header, m.RegionReadReply(msg.offset, msg.region, msg.count, data))

    def _region_write(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.RegionWriteRequest)
        self._check_access(msg.region, msg.offset, msg.count)
        if msg.count:
            self.function.write(msg.region, msg.offset, memoryview(msg.data))
        if not header.no_reply:
            self._reply(header, m.RegionWriteReply(msg.offset, msg.region, msg.count))

    def _region_write_multi(self, header: Header, msg: m.Message) -> None:
        assert isinstance(msg, m.RegionWriteMultiRequest)
        first_failure: AccessError | DmaError | None = None
        for entry in msg.entries:
            if not entry.count:
                continue
            try:
                self._check_access(entry.region, entry.offset, entry.count)
                self.function.write(entry.region, entry.offset,
                                    memoryview(entry.data)[: entry.count])
            except (AccessError, DmaError) as exc:
                # The rest of the batch still applies, in order; the batch
                # gets one answer (none when posted, as QEMU sends it).
                self.counters.error(header.command)
                first_failure = first_failure or exc
        if first_failure is not None:
            raise first_failure
        if not header.no_reply:
            self._reply(header, m.RegionWriteMultiReply())

    def _device_reset(self, header: Header, msg: m.Message) -> None:
        self.function.reset()
        log.info("session.device_reset", device=self.name)
        self._reply(header, m.DeviceResetReply())



def _sparse_mmap_capability(areas: tuple[tuple[int, int], ...]) -> bytes:
    header = (
        int(RegionCapabilityId.SPARSE_MMAP).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + (0).to_bytes(4, "little")
        + len(areas).to_bytes(4, "little")
        + bytes(4)
    )
    body = b"".join(o.to_bytes(8, "little") + s.to_bytes(8, "little") for o, s in areas)
    assert len(header) == SPARSE_MMAP_HEADER
    return header + body

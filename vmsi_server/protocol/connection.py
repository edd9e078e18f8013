"""Sans-io vfio-user connections: bytes and fds in, events out; bytes and fds to send back.

No sockets, no threads, no device knowledge. The transport feeds whatever ``recvmsg``
returned into :meth:`receive_data` and drains :meth:`next_event`; the session answers
with :meth:`reply` / :meth:`error_reply` and sends what they return. Modeled on h11.

Run states (checked on every call, like qemu.qmp's runstate)::

    AWAIT_VERSION --VERSION ok--> READY --EOF / fatal framing / close()--> CLOSED
          \\--------------- failed VERSION, EOF, close() -------------------/

File-descriptor attribution
---------------------------
``receive_data(chunk, fds)``: the fds belong to the LAST message whose header STARTS
within ``chunk``. Why this is exact on Linux: ``unix_stream_sendmsg`` attaches the
SCM_RIGHTS fds to the first skb of the ``sendmsg`` call, and a vfio-user peer sends each
message with its own ``sendmsg`` (QEMU does; so must our client's transport), so the fds
ride on the skb that begins the message. ``unix_stream_read_generic`` hands the fds out
with the first ``recvmsg`` that touches that skb and then stops the read right after
that skb (it never merges the next skb's fds into the same call). Hence a chunk that
carries fds contains the start of their message, and no message starts after it in
the same chunk, unless that message began inside the same skb, which the one-message-
per-sendmsg rule excludes. If the message is still incomplete its fds wait for the rest.
Fds in a chunk where no message starts cannot be attributed: they are closed and
counted in ``stray_fds_closed``.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from .capabilities import (
    QEMU_CAPABILITIES,
    Capabilities,
    NegotiatedParameters,
    ServerLimits,
    accept_server_reply,
    negotiate,
    parse_capabilities,
)
from .codec import (
    CLIENT_REQUESTS,
    NOT_IMPLEMENTED_COMMANDS,
    REPLIES,
    SERVER_REQUESTS,
    Decoder,
    decoder_for,
    encode_body,
)
from .constants import (
    E2BIG,
    EINVAL,
    ENOSYS,
    ERROR_FLAG,
    HEADER_SIZE,
    HEADER_STRUCT,
    MESSAGE_TYPE_MASK,
    NO_REPLY,
    PRE_VERSION_MAX_MESSAGE,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    REGION_INFO_ARGSZ,
    SPEC_DEFAULT_MAX_MSG_FDS,
    U64_LIMIT,
    Command,
    MessageType,
)
from .errors import LocalProtocolError, ProtocolError
from .events import (
    BadRequest,
    ConnectionClosed,
    Event,
    ReplyReceived,
    Request,
    UnexpectedReply,
    VersionNegotiated,
)
from .fds import close_fds
from .header import Header
from .messages import (
    BytesLike,
    DirtyPagesRequest,
    DmaLayout,
    DmaReadReply,
    DmaWriteReply,
    Fds,
    Message,
    RegionInfoReply,
    RegionInfoRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    VersionReply,
    VersionRequest,
)

_unpack_header = HEADER_STRUCT.unpack_from
_pack_header = HEADER_STRUCT.pack
_COMMAND = MessageType.COMMAND.value
_REPLY = MessageType.REPLY.value
_ERROR_REPLY_FLAGS = _REPLY | ERROR_FLAG
_ID_SPACE = 1 << 16
_REGION_READ = int(Command.REGION_READ)
_REGION_READ_FRAME = struct.Struct("<HHIIIQII")
"""A REGION_READ request, or a reply's first 32 bytes: header, then offset, region, count."""
REGION_READ_REQUEST_SIZE = _REGION_READ_FRAME.size
_unpack_region_read = _REGION_READ_FRAME.unpack
_pack_region_read = _REGION_READ_FRAME.pack
_unpack_access_from = _REGION_READ_FRAME.unpack_from
"""REGION_WRITE requests start with the same 32 bytes, then carry ``count`` data bytes."""
_REGION_WRITE = int(Command.REGION_WRITE)

PostedWrite = tuple[int, int, int, memoryview]
"""``(msg_id, offset, region, data)`` of one posted REGION_WRITE."""


class RunState(enum.Enum):
    AWAIT_VERSION = "await_version"
    READY = "ready"
    CLOSED = "closed"


def _message_fds(event: Event) -> Fds:
    if isinstance(event, Request):
        return event.message.attached_fds()
    if isinstance(event, ReplyReceived):
        return event.fds
    return ()


_READY = RunState.READY
_CLOSED = RunState.CLOSED


class _Connection:
    """Framing, fd attribution, outstanding-request tracking and reply building, shared
    by both ends. Subclasses decide what an incoming *request* means."""

    def __init__(self, dma_layout: DmaLayout) -> None:
        self.state = RunState.AWAIT_VERSION
        self.negotiated: NegotiatedParameters | None = None
        self.dma_layout = dma_layout
        self.suppressed_errors = 0
        """Error replies not sent because the request carried NO_REPLY (count, log)."""
        self.stray_fds_closed = 0
        """fds that arrived with no message start in their chunk (closed, see module doc)."""
        self._buf = bytearray()
        self._partial_fds: list[int] = []
        self._events: deque[Event] = deque()
        self._outstanding: dict[int, Message] = {}
        self._next_id = 0
        self._max_message_size = PRE_VERSION_MAX_MESSAGE
        self._max_fds_in = 0
        self._max_fds_out = 0
        self._reply_decoders: dict[int, Decoder] = {
            cmd: decoder_for(cls, dma_layout) for cmd, cls in REPLIES.items()
        }

    # ------------------------------------------------------------------ public API

    @property
    def max_message_size(self) -> int:
        """Messages announcing a larger size are fatal (checked on the header alone)."""
        return self._max_message_size

    @property
    def ready(self) -> bool:
        """VERSION negotiated and the connection not closed."""
        return self.state is _READY

    @property
    def buffered(self) -> bool:
        """Whether part of a message (or fds for one) waits for more data."""
        return bool(self._buf or self._partial_fds)

    @property
    def outstanding(self) -> Mapping[int, Message]:
        """Our requests still waiting for a reply, by msg_id."""
        return MappingProxyType(self._outstanding)

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed."""
        events = self._events
        return events.popleft() if events else None

    @property
    def pending_events(self) -> deque[Event]:
        """The queue :meth:`next_event` takes from, oldest first; the same object for the
        connection's whole life. A consumer on a hot path may keep it and ``popleft()``
        while it is non-empty instead of calling ``next_event`` (one call per event,
        plus the one that finds it empty). Never append to it."""
        return self._events

    def receive_data(self, data: BytesLike, fds: Sequence[int] = ()) -> None:
        """Feed one ``recvmsg`` result: its bytes and the fds that came with it.

        ``b""`` means end of stream. The connection owns ``fds`` from here on: they end
        up in an event or are closed. Never raises on peer input.
        """
        # Fast path, the shape of nearly every message at run time: READY, nothing
        # buffered, no fds, exactly one whole message in the chunk, plain command or reply.
        if not fds and not self._buf and type(data) is bytes and self.state is _READY:
            n = len(data)
            if n >= HEADER_SIZE:
                msg_id, command, size, flags, error = _unpack_header(data, 0)
                if size == n and size <= self._max_message_size:
                    if not flags & ~NO_REPLY:
                        self._handle_request(Header(msg_id, command, size, flags, error),
                                             memoryview(data)[HEADER_SIZE:], ())
                        return
                    if flags == _REPLY:
                        self._handle_reply(Header(msg_id, command, size, flags, error),
                                           memoryview(data)[HEADER_SIZE:], ())
                        return
        if self.state is _CLOSED:
            close_fds(fds)
            return
        if not data:
            self._on_eof(fds)
            return
        buf = self._buf
        if buf:
            chunk_start = len(buf)
            buf += data
            self._parse(buf, chunk_start, tuple(fds))
        else:
            self._parse(data if type(data) is bytes else bytes(data), 0, tuple(fds))

    def reply(
        self, request_header: Header, reply_message: Message, fds: Sequence[int] = ()
    ) -> tuple[bytes, list[int]]:
        """Bytes and fds answering ``request_header``; ``(b"", [])`` for NO_REPLY requests.

        ``fds`` default to the message's own (``RegionInfoReply.fd`` ...). The caller
        keeps ownership of its fds either way (the kernel duplicates them on send).
        """
        flags = request_header.flags
        if flags & NO_REPLY:
            return b"", []
        if flags & MESSAGE_TYPE_MASK != _COMMAND:
            raise LocalProtocolError("cannot reply to a reply")
        cls = type(reply_message)
        if not cls.IS_REPLY or request_header.command != cls.COMMAND:
            raise LocalProtocolError(
                f"{cls.__name__} does not answer command {request_header.command}"
            )
        if cls.LAYOUT_DEPENDENT:
            body = encode_body(reply_message, self.dma_layout)
        else:
            body = reply_message.encode()
        if fds:
            out = list(fds)
        elif cls.HAS_FDS:
            out = list(reply_message.attached_fds())
        else:
            out = []
        if out and len(out) > self._max_fds_out:
            raise LocalProtocolError(f"{len(out)} fds, the peer accepts {self._max_fds_out}")
        head = _pack_header(request_header.msg_id, request_header.command,
                            HEADER_SIZE + len(body), _REPLY, 0)
        return head + body, out

    def error_reply(self, request_header: Header, errno: int) -> bytes:
        """A header-only error reply (flags REPLY|ERROR, size 16, positive errno).

        Returns b"" for a NO_REPLY request (counted in ``suppressed_errors``: a server
        that answers posted writes falls out of step with QEMU) and for a reply (never
        answer a reply).
        """
        if not 0 < errno < 1 << 32:
            raise LocalProtocolError(f"errno must be positive, got {errno}")
        flags = request_header.flags
        if flags & NO_REPLY:
            self.suppressed_errors += 1
            return b""
        if flags & MESSAGE_TYPE_MASK == _REPLY:
            return b""
        return _pack_header(request_header.msg_id, request_header.command, HEADER_SIZE,
                            _ERROR_REPLY_FLAGS, errno)

    def close(self) -> None:
        """Drop everything: close the fds of a half-received message and of events not
        yet taken, forget outstanding requests. Idempotent."""
        close_fds(self._partial_fds)
        self._partial_fds = []
        for event in self._events:
            close_fds(_message_fds(event))
        self._events.clear()
        self._buf.clear()
        self._outstanding.clear()
        self.state = RunState.CLOSED

    # --------------------------------------------------------------- framing

    def _parse(self, work: bytes | bytearray, chunk_start: int, fds: Fds) -> None:
        """Cut ``work`` (buffered bytes + the new chunk, which starts at ``chunk_start``)
        into messages and dispatch each complete one; keep the incomplete tail."""
        n = len(work)
        target = -1
        if fds:
            target = _last_start(work, chunk_start)
            if target < 0:
                close_fds(fds)
                self.stray_fds_closed += len(fds)
                fds = ()
        owned = type(work) is bytes  # immutable: bodies may be views into it
        mv = memoryview(work)
        pos = 0
        events = self._events
        handle_request = self._handle_request
        try:
            while n - pos >= HEADER_SIZE:
                msg_id, command, size, flags, error = _unpack_header(work, pos)
                if size < HEADER_SIZE or size > self._max_message_size:
                    reason = (f"message size {size} below the header size"
                              if size < HEADER_SIZE else
                              f"message size {size} above the limit {self._max_message_size}")
                    self._fatal(Header(msg_id, command, size, flags, error), EINVAL, reason,
                                fds if target >= pos else ())
                    return
                end = pos + size
                if end > n:
                    break
                if pos == target:
                    mfds = fds
                elif pos == 0 and chunk_start:
                    mfds = tuple(self._partial_fds)
                    self._partial_fds = []
                else:
                    mfds = ()
                if owned:
                    body = mv[pos + HEADER_SIZE:end]
                else:
                    body = memoryview(bytes(mv[pos + HEADER_SIZE:end]))
                header = Header(msg_id, command, size, flags, error)
                pos = end
                mtype = flags & MESSAGE_TYPE_MASK
                if mtype == _COMMAND and not flags & ERROR_FLAG:
                    handle_request(header, body, mfds)
                elif mtype == _REPLY:
                    self._handle_reply(header, body, mfds)
                else:
                    close_fds(mfds)
                    events.append(BadRequest(header, EINVAL,
                                             f"invalid message type/flags {flags:#x}"))
                if self.state is _CLOSED:  # a fatal request (failed VERSION)
                    if target >= pos:
                        close_fds(fds)
                    return
            if pos < n:
                if target >= pos:
                    self._partial_fds = list(fds)
                if owned:
                    self._buf += mv[pos:]
        finally:
            mv.release()
            if not owned:
                if self.state is RunState.CLOSED:
                    self._buf.clear()
                else:
                    del self._buf[:pos]

    def _fatal(self, header: Header, errno: int, reason: str, fds: Fds) -> None:
        close_fds(fds)
        close_fds(self._partial_fds)
        self._partial_fds = []
        self.state = RunState.CLOSED
        self._events.append(BadRequest(header, errno, reason, fatal=True))

    def _reject(self, header: Header, errno: int, reason: str, fds: Fds) -> None:
        close_fds(fds)
        self._events.append(BadRequest(header, errno, reason))

    def _on_eof(self, fds: Sequence[int]) -> None:
        close_fds(fds)
        clean = not self._buf
        close_fds(self._partial_fds)
        self._partial_fds = []
        self._buf.clear()
        unanswered = tuple(self._outstanding.values())
        self._outstanding.clear()
        self.state = RunState.CLOSED
        reason = "peer closed the stream" if clean else (
            "peer closed the stream inside a message")
        self._events.append(ConnectionClosed(clean, reason, unanswered))

    # ---------------------------------------------------------- requests we send

    def _allocate_id(self) -> int:
        for _ in range(_ID_SPACE):
            msg_id = self._next_id
            self._next_id = (msg_id + 1) % _ID_SPACE
            if msg_id not in self._outstanding:
                return msg_id
        raise LocalProtocolError("65536 requests outstanding; no message id left")

    def _send_request(self, message: Message, no_reply: bool) -> tuple[bytes, list[int], int]:
        fds = list(message.attached_fds())
        if len(fds) > self._max_fds_out:
            raise LocalProtocolError(f"{len(fds)} fds, the peer accepts {self._max_fds_out}")
        body = encode_body(message, self.dma_layout)
        msg_id = self._allocate_id()
        if not no_reply:
            self._outstanding[msg_id] = message
        flags = _COMMAND | (NO_REPLY if no_reply else 0)
        head = _pack_header(msg_id, message.COMMAND, HEADER_SIZE + len(body), flags, 0)
        return head + body, fds, msg_id

    # ---------------------------------------------------------- incoming messages

    def _handle_request(self, header: Header, body: memoryview, fds: Fds) -> None:
        raise NotImplementedError

    def _handle_reply(self, header: Header, body: memoryview, fds: Fds) -> None:
        request = self._outstanding.get(header.msg_id)
        if request is None or header.command != request.COMMAND:
            close_fds(fds)
            reason = ("reply to no outstanding request" if request is None else
                      f"reply command {header.command} does not match request "
                      f"{request.COMMAND.name}")
            self._events.append(UnexpectedReply(header, reason))
            return
        del self._outstanding[header.msg_id]
        event: ReplyReceived
        if header.flags & ERROR_FLAG:
            close_fds(fds)
            event = ReplyReceived(header, body, (), request, None, header.error or EINVAL)
        else:
            try:
                if len(fds) > self._max_fds_in:
                    raise ProtocolError(EINVAL, f"{len(fds)} fds, we accept {self._max_fds_in}")
                message = self._reply_decoders[header.command](body, fds)
                message = self._check_reply(request, message)
            except ProtocolError as exc:
                close_fds(fds)
                event = ReplyReceived(header, body, (), request, None, exc.errno)
            else:
                event = ReplyReceived(header, body, fds, request, message)
        self._events.append(event)
        self._on_reply_event(event)

    def _check_reply(self, request: Message, message: Message) -> Message:
        """Checks that need the request: a reply must answer what was asked."""
        if isinstance(message, DmaReadReply):
            if (message.address, message.count) != (
                getattr(request, "address", None), getattr(request, "count", None)
            ):
                raise ProtocolError(EINVAL, "DMA_READ reply for another address/count")
        elif isinstance(message, DmaWriteReply):
            address = getattr(request, "address", 0)
            count = getattr(request, "count", 0)
            if self.dma_layout is DmaLayout.QEMU:
                return replace(message, address=address, count=count)
            if (message.address, message.count) != (address, count):
                raise ProtocolError(EINVAL, "DMA_WRITE reply for another address/count")
        elif isinstance(message, RegionReadReply) and isinstance(request, RegionReadRequest):
            if message.count > request.count:
                raise ProtocolError(E2BIG, "REGION_READ reply larger than requested")
        elif (isinstance(message, RegionInfoReply) and isinstance(request, RegionInfoRequest)
              and REGION_INFO_ARGSZ + len(message.caps) > request.argsz):
            raise ProtocolError(E2BIG, "GET_REGION_INFO reply larger than argsz")
        return message

    def _on_reply_event(self, event: ReplyReceived) -> None:
        pass


def _last_start(work: bytes | bytearray, chunk_start: int) -> int:
    """Offset of the last message start at or after ``chunk_start``, or -1.

    Walks the headers only; a nonsense size stops the walk at that message, which is
    then the last start (it will be rejected as fatal anyway).
    """
    n = len(work)
    pos = 0
    last = -1
    while pos < n:
        if pos >= chunk_start:
            last = pos
        if n - pos < HEADER_SIZE:
            break
        size = _unpack_header(work, pos)[2]
        if size < HEADER_SIZE:
            break
        pos += size
    return last


class ServerConnection(_Connection):
    """The server end: QEMU's requests in, our replies and DMA requests out.

    ``Request`` events carry fully validated messages (protocol level); the session adds
    the device-level checks. Unknown commands, replies to nothing and malformed bodies
    never reach it as requests.
    """

    def __init__(self, limits: ServerLimits | None = None, *,
                 dma_layout: DmaLayout = DmaLayout.QEMU) -> None:
        super().__init__(dma_layout)
        self.limits = limits if limits is not None else ServerLimits()
        self.client_capabilities: Capabilities | None = None
        self._decoders: dict[int, Decoder] = {}
        self._max_xfer = 0

    @property
    def max_xfer(self) -> int:
        """The negotiated max_data_xfer_size (0 before VERSION)."""
        return self._max_xfer

    # ------------------------------------------------------- REGION_READ fast lane
    #
    # A guest's MMIO or config read is a synchronous REGION_READ: its vCPU waits for the
    # whole round trip, and QEMU sends them one at a time, each in its own recvmsg. For
    # that shape the general path builds a Header, a RegionReadRequest, a Request event
    # and a RegionReadReply per read; on a host where every round trip also pays two
    # context switches, touching that much Python per read is most of the server's
    # share of the wait (``make bench-rtt``). These two methods let a server answer
    # exactly that shape from plain ints: ``peek_region_read`` accepts only what the
    # general path would turn into one valid Request and nothing else, and does not
    # change the connection; everything else still goes through ``receive_data``.

    def peek_region_read(self, data: BytesLike,
                         fds: Sequence[int] = ()) -> tuple[int, int, int, int] | None:
        """``(msg_id, offset, region, count)`` when ``receive_data(data, fds)`` would
        produce exactly one ``Request`` for a REGION_READ that wants a reply (and change
        nothing else); None otherwise. Pure: the connection is not touched, so after a
        None (or when the caller decides not to answer the read itself) the caller feeds
        the same ``data`` and ``fds`` to :meth:`receive_data`."""
        if (fds or len(data) != REGION_READ_REQUEST_SIZE or self._buf
                or self.state is not _READY):
            return None
        msg_id, command, size, flags, error, offset, region, count = _unpack_region_read(data)
        if (command != _REGION_READ or size != REGION_READ_REQUEST_SIZE or flags != _COMMAND
                or error or count > self._max_xfer or offset + count > U64_LIMIT):
            return None  # posted, malformed or over the limit: the general path decides
        return msg_id, offset, region, count

    def peek_posted_writes(self, data: BytesLike,
                           fds: Sequence[int] = ()) -> list[PostedWrite] | None:
        """The writes, when ``data`` is nothing but whole, valid, posted REGION_WRITEs
        (what the guest's TDT/RDT/EIMS stores become, often several per read); None
        otherwise. Like :meth:`peek_region_read` it is pure: on None, or when the caller
        does not serve them itself, feed the same bytes to :meth:`receive_data`, which
        turns them into exactly these requests."""
        if fds or self._buf or self.state is not _READY:
            return None
        end = len(data)
        if end < REGION_READ_REQUEST_SIZE:
            return None
        view = memoryview(data)
        max_xfer = self._max_xfer
        writes: list[PostedWrite] = []
        pos = 0
        while pos < end:
            if end - pos < REGION_READ_REQUEST_SIZE:
                return None
            msg_id, command, size, flags, error, offset, region, count = _unpack_access_from(
                data, pos)
            if (command != _REGION_WRITE or flags != NO_REPLY or error
                    or size != REGION_READ_REQUEST_SIZE + count or pos + size > end
                    or count > max_xfer or offset + count > U64_LIMIT):
                return None  # anything else: the general path decides
            writes.append((msg_id, offset, region,
                           view[pos + REGION_READ_REQUEST_SIZE : pos + size]))
            pos += size
        return writes

    def region_read_reply(self, msg_id: int, offset: int, region: int, count: int,
                          data: BytesLike) -> bytes:
        """The reply to a read :meth:`peek_region_read` returned: the same bytes as
        ``reply(header, RegionReadReply(offset, region, count, data))``, in one pack."""
        if len(data) != count:
            raise LocalProtocolError(
                f"REGION_READ reply with {len(data)} data bytes for count {count}"
            )
        return _pack_region_read(msg_id, _REGION_READ, REGION_READ_REQUEST_SIZE + count,
                                 _REPLY, 0, offset, region, count) + data

    # -------------------------------------------------------------- requests we send

    def request(self, message: Message, *, no_reply: bool = False) -> tuple[bytes, list[int], int]:
        """Encode a server → client request (DMA_READ / DMA_WRITE); returns bytes, fds and
        the msg_id its ``ReplyReceived`` will carry. Only legal when READY."""
        if self.state is not RunState.READY or self.negotiated is None:
            raise LocalProtocolError(f"cannot send requests in state {self.state.name}")
        if message.IS_REPLY or message.COMMAND not in SERVER_REQUESTS:
            raise LocalProtocolError(f"{type(message).__name__} is not a server request")
        count: int = getattr(message, "count", 0)
        if count > self.negotiated.max_data_xfer_size:
            raise LocalProtocolError(
                f"DMA count {count} above max_data_xfer_size {self.negotiated.max_data_xfer_size}"
            )
        return self._send_request(message, no_reply)

    # -------------------------------------------------------------- internals

    def _handle_request(self, header: Header, body: memoryview, fds: Fds) -> None:
        if self.state is not _READY:
            self._handle_version(header, body, fds)
            return
        decoder = self._decoders.get(header.command)
        if decoder is None:
            command = header.command
            if command in NOT_IMPLEMENTED_COMMANDS:
                self._reject(header, ENOSYS, f"command {Command(command).name} not supported",
                             fds)
            else:
                self._reject(header, EINVAL, f"unknown command {command}", fds)
            return
        if fds and len(fds) > self._max_fds_in:
            self._reject(header, EINVAL, f"{len(fds)} fds, max_msg_fds is {self._max_fds_in}",
                         fds)
            return
        try:
            message = decoder(body, fds)
        except ProtocolError as exc:
            self._reject(header, exc.errno, exc.reason, fds)
            return
        # max_data_xfer_size is negotiated, so it is checked here rather than bound into
        # the decoder (a partial() with a keyword costs more than the whole decode).
        if isinstance(message, (RegionReadRequest, RegionWriteRequest)):
            count = message.count
            if count > self._max_xfer:
                self._reject(header, EINVAL, f"{Command(header.command).name} count {count} "
                             f"above max_data_xfer_size {self._max_xfer}", fds)
                return
        self._events.append(Request(header, message))

    def _handle_version(self, header: Header, body: memoryview, fds: Fds) -> None:
        if header.command != Command.VERSION:
            self._fatal(header, EINVAL, f"first message is command {header.command}, "
                        "not VERSION", fds)
            return
        try:
            request = VersionRequest.decode(body, fds)
            caps = parse_capabilities(request.capabilities)
            params = negotiate(caps, self.limits, client_major=request.major,
                               client_minor=request.minor, request_size=header.size)
        except ProtocolError as exc:
            self._fatal(header, exc.errno, exc.reason, fds)
            return
        self.client_capabilities = caps
        self.negotiated = params
        self.state = RunState.READY
        self._max_message_size = params.max_message_size
        self._max_fds_in = params.max_msg_fds
        self._max_fds_out = params.client_max_msg_fds
        self._max_xfer = params.max_data_xfer_size
        self._decoders = self._build_decoders(params)
        reply = VersionReply(PROTOCOL_MAJOR, params.minor, params.reply_capabilities)
        self._events.append(VersionNegotiated(header, request, caps, params, reply))

    def _build_decoders(self, params: NegotiatedParameters) -> dict[int, Decoder]:
        """Per-connection dispatch: layout and limits bound once, refusals precomputed."""
        table = {cmd: decoder_for(cls, self.dma_layout) for cmd, cls in CLIENT_REQUESTS.items()}

        def version_again(body: BytesLike, fds: Fds) -> Message:
            raise ProtocolError(EINVAL, "VERSION already negotiated")

        def dirty_pages(body: BytesLike, fds: Fds) -> Message:
            DirtyPagesRequest.decode(body, fds)
            raise ProtocolError(ENOSYS, "DIRTY_PAGES is retired; no migration support")

        def write_multi_refused(body: BytesLike, fds: Fds) -> Message:
            raise ProtocolError(EINVAL, "REGION_WRITE_MULTI without negotiated write_multiple")

        def wrong_direction(body: BytesLike, fds: Fds) -> Message:
            raise ProtocolError(EINVAL, "DMA_READ/DMA_WRITE are server-to-client requests")

        table[Command.VERSION] = version_again
        table[Command.DIRTY_PAGES] = dirty_pages
        if not params.write_multiple:
            table[Command.REGION_WRITE_MULTI] = write_multi_refused
        table[Command.DMA_READ] = wrong_direction
        table[Command.DMA_WRITE] = wrong_direction
        return table


class ClientConnection(_Connection):
    """The client end, for the project's own client library, tests, benchmarks and the
    replay tool: our requests out (ids 0, 1, 2, ... mod 2^16), replies and the server's
    DMA_READ/DMA_WRITE requests in. Checks replies the way QEMU does."""

    def __init__(self, capabilities: Capabilities = QEMU_CAPABILITIES, *,
                 dma_layout: DmaLayout = DmaLayout.QEMU, minor: int = PROTOCOL_MINOR) -> None:
        super().__init__(dma_layout)
        self.capabilities = capabilities
        self.minor = minor
        self._version_sent = False
        self._max_fds_in = capabilities.max_msg_fds
        self._max_fds_out = SPEC_DEFAULT_MAX_MSG_FDS  # until the server states its limit
        self._server_decoders: dict[int, Decoder] = {
            cmd: decoder_for(cls, dma_layout) for cmd, cls in SERVER_REQUESTS.items()
        }

    def version_request(self) -> VersionRequest:
        """The VERSION message proposing ``self.capabilities``."""
        return VersionRequest(PROTOCOL_MAJOR, self.minor, self.capabilities.to_json())

    def request(self, message: Message, *, no_reply: bool = False) -> tuple[bytes, list[int], int]:
        """Encode a client → server request. VERSION must come first; later requests may
        be pipelined behind it. ``no_reply`` sends it posted (no reply is tracked)."""
        if self.state is RunState.CLOSED:
            raise LocalProtocolError("connection is closed")
        if message.IS_REPLY or message.COMMAND not in CLIENT_REQUESTS:
            raise LocalProtocolError(f"{type(message).__name__} is not a client request")
        if isinstance(message, VersionRequest):
            if self._version_sent:
                raise LocalProtocolError("VERSION already sent")
            self._version_sent = True
        elif not self._version_sent:
            raise LocalProtocolError("the first request must be VERSION")
        return self._send_request(message, no_reply)

    def _handle_request(self, header: Header, body: memoryview, fds: Fds) -> None:
        # Mirrors QEMU's vfio_user_pci_process_req: fds -> EINVAL, unknown -> ENOSYS.
        decoder = self._server_decoders.get(header.command)
        if fds:
            self._reject(header, EINVAL, "server requests carry no fds", fds)
            return
        if decoder is None:
            self._reject(header, ENOSYS, f"command {header.command} is not a server request",
                         fds)
            return
        try:
            message = decoder(body, fds)
        except ProtocolError as exc:
            self._reject(header, exc.errno, exc.reason, fds)
            return
        limit = (self.negotiated.max_data_xfer_size if self.negotiated is not None
                 else self.capabilities.max_data_xfer_size)
        if getattr(message, "count", 0) > limit:
            self._reject(header, E2BIG, "DMA count above max_data_xfer_size", ())
            return
        self._events.append(Request(header, message))

    def _check_reply(self, request: Message, message: Message) -> Message:
        if isinstance(message, VersionReply):
            params = accept_server_reply(
                self.capabilities, server_major=message.major, server_minor=message.minor,
                server_text=message.capabilities, our_minor=self.minor,
            )
            self.negotiated = params
            self.state = RunState.READY
            self._max_message_size = params.max_message_size
            self._max_fds_out = params.max_msg_fds
            self._max_fds_in = params.client_max_msg_fds
            return message
        return super()._check_reply(request, message)

    def _on_reply_event(self, event: ReplyReceived) -> None:
        if isinstance(event.request, VersionRequest) and event.errno:
            # Without a version there is nothing to talk about: stop parsing (the parse
            # loop sees CLOSED) but keep the queued events, including this one.
            close_fds(self._partial_fds)
            self._partial_fds = []
            self._outstanding.clear()
            self.state = RunState.CLOSED

"""Typed vfio-user message bodies, one frozen dataclass per command and direction.

Every class encodes and decodes the *body* only (the bytes after the 16-byte header,
offsets below are from there). ``decode(body, fds)`` validates every field that can be
checked without knowing the device and raises :class:`~.errors.ProtocolError` with the
errno the error reply must carry; it never closes fds (the connection does that, so there
is exactly one place that owns them). Checks that need the device (region index below
``num_regions``, bounds inside a region, IRQ vector counts) belong to the session.

Requests and replies with identical layouts still get distinct classes, so that a session
can ``match`` on the type without ever mistaking a reply for a command.

All integers are little-endian (the wire is host order and the project targets x86-64).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import ClassVar, NoReturn, Self, TypeAlias

from ._frozen import fast_init
from .constants import (
    DEVICE_INFO_ARGSZ,
    DIRTY_PAGES_FIXED,
    DMA_MAP_ARGSZ,
    DMA_RW_FIXED,
    DMA_UNMAP_ARGSZ,
    E2BIG,
    EINVAL,
    IRQ_INFO_ARGSZ,
    MAX_VERSION_JSON,
    REGION_ACCESS_FIXED,
    REGION_INFO_ARGSZ,
    REGION_IO_FDS_ARGSZ,
    REGION_IO_FDS_ENTRY,
    SET_IRQS_ACTION_MASK,
    SET_IRQS_ARGSZ,
    SET_IRQS_DATA_MASK,
    SET_IRQS_KNOWN_FLAGS,
    U32_LIMIT,
    U64_LIMIT,
    VERSION_FIXED,
    WRITE_MULTI_ENTRY,
    WRITE_MULTI_MAX_DATA,
    WRITE_MULTI_MAX_ENTRIES,
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    RegionInfoFlags,
    SetIrqsFlags,
)
from .errors import LocalProtocolError, ProtocolError

BytesLike: TypeAlias = bytes | bytearray | memoryview
Fds: TypeAlias = tuple[int, ...]

U32_MAX = U32_LIMIT - 1


class DmaLayout(enum.Enum):
    """Which DMA_READ/DMA_WRITE body layout a connection speaks.

    QEMU and the specification disagree (reference §9.2) and cannot interoperate, so the
    choice is explicit and per connection. QEMU is the default because it is the client.

    ======== =================================== ===================================
    layout   request / DMA_READ reply body       DMA_WRITE reply body
    ======== =================================== ===================================
    QEMU     ``<QI`` address, count; data @12;   empty (header only)
             4 zero bytes after the data (QEMU's
             ``sizeof(VFIOUserDMARW)`` is 32)
    SPEC     ``<QQ`` address, count; data @16    ``<QQ`` address, count
    ======== =================================== ===================================
    """

    QEMU = "qemu"
    SPEC = "spec"


def _fail(reason: str, errno: int = EINVAL) -> NoReturn:
    raise ProtocolError(errno, reason)


def _no_fds(fds: Fds, what: str) -> None:
    if fds:
        _fail(f"{what} takes no fds, got {len(fds)}")


class Message:
    """Base of every message body. ``COMMAND`` and ``IS_REPLY`` say where it belongs."""

    __slots__ = ()
    COMMAND: ClassVar[Command]
    IS_REPLY: ClassVar[bool] = False
    HAS_FDS: ClassVar[bool] = False
    """True when :meth:`attached_fds` can return fds (lets the hot path skip the call)."""
    LAYOUT_DEPENDENT: ClassVar[bool] = False
    """True for DMA_READ/DMA_WRITE, whose ``encode``/``decode`` take a :class:`DmaLayout`."""

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        raise NotImplementedError

    def attached_fds(self) -> Fds:
        """fds that travel with this message as SCM_RIGHTS (none for most commands)."""
        return ()


# --------------------------------------------------------------------------- VERSION

_VERSION = struct.Struct("<HH")


def _capability_text(raw: bytes) -> str:
    """The JSON text of a VERSION body, without its NUL; "" when there is none.

    A missing NUL, a NUL inside the text, oversized text and invalid UTF-8 are all
    EINVAL: QEMU itself calls an unterminated string "corrupt", and anything else would
    make the JSON parser see something other than what the peer meant.
    """
    if not raw:
        return ""
    if raw[-1] != 0:
        _fail("VERSION capabilities are not NUL-terminated")
    text = raw[:-1]
    if len(text) > MAX_VERSION_JSON:
        _fail(f"VERSION capabilities longer than {MAX_VERSION_JSON} bytes")
    if 0 in text:
        _fail("VERSION capabilities contain a NUL before the end")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        _fail("VERSION capabilities are not UTF-8")


@fast_init
@dataclass(frozen=True, slots=True)
class _VersionBody(Message):
    """VERSION request and reply share this layout.

    ====== ==== ============ =============================================
    offset size field        notes
    ====== ==== ============ =============================================
    0      2    major        must be 0
    2      2    minor
    4      var  capabilities UTF-8 JSON + NUL; absent when empty
    ====== ==== ============ =============================================

    ``capabilities`` holds the JSON text without the NUL; parse it with
    :func:`~.capabilities.parse_capabilities`.
    """

    COMMAND: ClassVar[Command] = Command.VERSION
    major: int
    minor: int
    capabilities: str = ""

    def encode(self) -> bytes:
        head = _VERSION.pack(self.major, self.minor)
        if not self.capabilities:
            return head
        return head + self.capabilities.encode("utf-8") + b"\0"

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "VERSION")  # fds only exist in twin-socket mode, which we never offer
        if len(body) < VERSION_FIXED:
            _fail(f"VERSION body of {len(body)} bytes, needs {VERSION_FIXED}")
        major, minor = _VERSION.unpack_from(body)
        return cls(major, minor, _capability_text(bytes(body[VERSION_FIXED:])))


@fast_init
@dataclass(frozen=True, slots=True)
class VersionRequest(_VersionBody):
    pass


@fast_init
@dataclass(frozen=True, slots=True)
class VersionReply(_VersionBody):
    IS_REPLY: ClassVar[bool] = True


# ----------------------------------------------------------------- empty-body messages


@fast_init
@dataclass(frozen=True, slots=True)
class _EmptyBody(Message):
    """Messages whose body is empty. Anything in the body or any fd is EINVAL: the sender
    and we disagree about the command, and guessing would be worse than refusing."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, cls.COMMAND.name)
        if len(body):
            _fail(f"{cls.COMMAND.name} {'reply' if cls.IS_REPLY else 'request'} "
                  f"has a {len(body)}-byte body, expected none")
        return cls()


# --------------------------------------------------------------------------- DMA_MAP

_DMA_MAP = struct.Struct("<IIQQQ")
# Plain ints on purpose: ``~`` on an IntFlag only inverts within its defined members.
_DMA_MAP_KNOWN_FLAGS = int(DmaMapFlags.READ | DmaMapFlags.WRITE)
_UNMAP_ALL = int(DmaUnmapFlags.UNMAP_ALL)
_GET_DIRTY_BITMAP = int(DmaUnmapFlags.GET_DIRTY_BITMAP)


@fast_init
@dataclass(frozen=True, slots=True)
class DmaMapRequest(Message):
    """DMA_MAP: ``<IIQQQ``, 32 bytes, plus zero or one fd (the memory object).

    ====== ==== ======= ===============================================
    offset size field   notes
    ====== ==== ======= ===============================================
    0      4    argsz   exactly 32
    4      4    flags   READ 0x1 | WRITE 0x2; other bits EINVAL
    8      8    offset  offset of the range inside ``fd``
    16     8    address guest-physical (IOVA) base
    24     8    size    bytes
    ====== ==== ======= ===============================================

    ``fd`` is None for memory QEMU cannot share (ROMs, VGA): such maps must still be
    accepted (reference §9.2), so an absent fd is not a codec error.
    """

    HAS_FDS: ClassVar[bool] = True
    COMMAND: ClassVar[Command] = Command.DMA_MAP
    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None

    def encode(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    def attached_fds(self) -> Fds:
        return () if self.fd is None else (self.fd,)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        if len(body) < DMA_MAP_ARGSZ:
            _fail(f"DMA_MAP body of {len(body)} bytes, needs {DMA_MAP_ARGSZ}")
        argsz, flags, offset, address, size = _DMA_MAP.unpack_from(body)
        if argsz != DMA_MAP_ARGSZ:
            _fail(f"DMA_MAP argsz {argsz}, must be {DMA_MAP_ARGSZ}")
        if len(body) != DMA_MAP_ARGSZ:
            _fail(f"DMA_MAP body of {len(body)} bytes, must be {DMA_MAP_ARGSZ}")
        if flags & ~_DMA_MAP_KNOWN_FLAGS:
            _fail(f"DMA_MAP unknown flags {flags:#x}")
        if address + size > U64_LIMIT:
            _fail("DMA_MAP address + size wraps around 2^64")
        if offset + size > U64_LIMIT:
            _fail("DMA_MAP offset + size wraps around 2^64")
        if len(fds) > 1:
            _fail(f"DMA_MAP carries at most one fd, got {len(fds)}")
        return cls(argsz, flags, offset, address, size, fds[0] if fds else None)


@fast_init
@dataclass(frozen=True, slots=True)
class DmaMapReply(_EmptyBody):
    """DMA_MAP reply: empty body."""

    COMMAND: ClassVar[Command] = Command.DMA_MAP
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------------------- DMA_UNMAP

_DMA_UNMAP = struct.Struct("<IIQQ")


@fast_init
@dataclass(frozen=True, slots=True)
class _DmaUnmapBody(Message):
    """DMA_UNMAP request, and its reply which echoes the entry: ``<IIQQ``, 24 bytes.

    ====== ==== ======= =====================================================
    offset size field   notes
    ====== ==== ======= =====================================================
    0      4    argsz   >= 24 (a dirty bitmap would follow; we support none)
    4      4    flags   0 or UNMAP_ALL 0x2; GET_DIRTY_BITMAP 0x1 is refused
                        (no migration is negotiated), anything else EINVAL
    8      8    address must match a map exactly (session's check)
    16     8    size
    ====== ==== ======= =====================================================
    """

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    argsz: int
    flags: int
    address: int
    size: int

    def encode(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DMA_UNMAP")
        if len(body) < DMA_UNMAP_ARGSZ:
            _fail(f"DMA_UNMAP body of {len(body)} bytes, needs {DMA_UNMAP_ARGSZ}")
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(body)
        if argsz < DMA_UNMAP_ARGSZ:
            _fail(f"DMA_UNMAP argsz {argsz} below {DMA_UNMAP_ARGSZ}")
        if flags & _GET_DIRTY_BITMAP:
            _fail("DMA_UNMAP GET_DIRTY_BITMAP without negotiated migration")
        if flags & ~_UNMAP_ALL:
            _fail(f"DMA_UNMAP unknown flags {flags:#x}")
        if flags & _UNMAP_ALL:
            if address or size:
                _fail("DMA_UNMAP UNMAP_ALL with a non-zero address or size")
        elif address + size > U64_LIMIT:
            _fail("DMA_UNMAP address + size wraps around 2^64")
        return cls(argsz, flags, address, size)

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & DmaUnmapFlags.UNMAP_ALL)


@fast_init
@dataclass(frozen=True, slots=True)
class DmaUnmapRequest(_DmaUnmapBody):
    pass


@fast_init
@dataclass(frozen=True, slots=True)
class DmaUnmapReply(_DmaUnmapBody):
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------------- DEVICE_GET_INFO

_U32 = struct.Struct("<I")
_U32X4 = struct.Struct("<IIII")


@fast_init
@dataclass(frozen=True, slots=True)
class DeviceGetInfoRequest(Message):
    """DEVICE_GET_INFO request: the 16-byte ``vfio_device_info`` of which only ``argsz``
    means anything. Body or argsz below 16 is EINVAL; a larger argsz is fine."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    argsz: int = DEVICE_INFO_ARGSZ

    def encode(self) -> bytes:
        return _U32X4.pack(self.argsz, 0, 0, 0)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO")
        if len(body) < DEVICE_INFO_ARGSZ:
            _fail(f"DEVICE_GET_INFO body of {len(body)} bytes, needs {DEVICE_INFO_ARGSZ}")
        (argsz,) = _U32.unpack_from(body)
        if argsz < DEVICE_INFO_ARGSZ:
            _fail(f"DEVICE_GET_INFO argsz {argsz} below {DEVICE_INFO_ARGSZ}")
        return cls(argsz)


@fast_init
@dataclass(frozen=True, slots=True)
class DeviceGetInfoReply(Message):
    """DEVICE_GET_INFO reply: ``<IIII`` argsz (16), flags (PCI 0x2 | RESET 0x1),
    num_regions (>= 8 for QEMU), num_irqs (>= 3 for QEMU)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    IS_REPLY: ClassVar[bool] = True
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    def encode(self) -> bytes:
        return _U32X4.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO reply")
        if len(body) < DEVICE_INFO_ARGSZ:
            _fail(f"DEVICE_GET_INFO reply of {len(body)} bytes, needs {DEVICE_INFO_ARGSZ}")
        return cls(*_U32X4.unpack_from(body))


# ------------------------------------------------------------ DEVICE_GET_REGION_INFO

_REGION_INFO = struct.Struct("<IIIIQQ")


@fast_init
@dataclass(frozen=True, slots=True)
class RegionInfoRequest(Message):
    """DEVICE_GET_REGION_INFO request: the 32-byte ``vfio_region_info``; only ``argsz``
    (the size of the client's reply buffer minus the header) and ``index`` matter.

    ====== ==== ========== ======
    offset size field
    ====== ==== ========== ======
    0      4    argsz      >= 32
    4      4    flags
    8      4    index
    12     4    cap_offset
    16     8    size
    24     8    offset
    ====== ==== ========== ======
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    argsz: int
    flags: int
    index: int
    cap_offset: int = 0
    size: int = 0
    offset: int = 0

    def encode(self) -> bytes:
        return _REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_REGION_INFO")
        if len(body) < REGION_INFO_ARGSZ:
            _fail(f"DEVICE_GET_REGION_INFO body of {len(body)} bytes, needs {REGION_INFO_ARGSZ}")
        fields = _REGION_INFO.unpack_from(body)
        if fields[0] < REGION_INFO_ARGSZ:
            _fail(f"DEVICE_GET_REGION_INFO argsz {fields[0]} below {REGION_INFO_ARGSZ}")
        return cls(*fields)


@fast_init
@dataclass(frozen=True, slots=True)
class RegionInfoReply(Message):
    """DEVICE_GET_REGION_INFO reply: the same 32 bytes, then the capability chain
    (``caps``, whose first header sits at ``cap_offset`` counted from the start of the
    structure, i.e. 32 for a chain that follows directly), plus exactly one fd when the
    region is MMAP-able.

    QEMU's buffer is ``16 + argsz`` of its request, so a reply must never be longer than
    that; :meth:`fit` does the "argsz retry" dance.
    """

    HAS_FDS: ClassVar[bool] = True
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    IS_REPLY: ClassVar[bool] = True
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: bytes = b""
    fd: int | None = None

    def encode(self) -> bytes:
        return (
            _REGION_INFO.pack(
                self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
            )
            + self.caps
        )

    def attached_fds(self) -> Fds:
        return () if self.fd is None else (self.fd,)

    def fit(self, requested_argsz: int) -> RegionInfoReply:
        """This reply sized for a request that offered ``requested_argsz`` bytes.

        ``argsz`` always becomes the full size (32 + caps). When that does not fit, the
        caps and the fd are left out: QEMU sees ``argsz`` grow, asks again with the
        larger size, and only then takes the fd (sending it twice would leak one).
        """
        needed = REGION_INFO_ARGSZ + len(self.caps)
        if requested_argsz >= needed:
            return replace(self, argsz=needed)
        return replace(self, argsz=needed, caps=b"", fd=None)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        if len(body) < REGION_INFO_ARGSZ:
            _fail(f"DEVICE_GET_REGION_INFO reply of {len(body)} bytes, needs {REGION_INFO_ARGSZ}")
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(body)
        if argsz < REGION_INFO_ARGSZ:
            _fail(f"DEVICE_GET_REGION_INFO reply argsz {argsz} below {REGION_INFO_ARGSZ}")
        if len(fds) > 1:
            _fail(f"DEVICE_GET_REGION_INFO reply carries {len(fds)} fds, at most one allowed")
        if fds and not flags & RegionInfoFlags.MMAP:
            _fail("DEVICE_GET_REGION_INFO reply carries an fd without MMAP")
        return cls(argsz, flags, index, cap_offset, size, offset,
                   bytes(body[REGION_INFO_ARGSZ:]), fds[0] if fds else None)


# --------------------------------------------------------- DEVICE_GET_REGION_IO_FDS

_SUB_REGION = struct.Struct("<QQIIIIQ")


@fast_init
@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest(Message):
    """DEVICE_GET_REGION_IO_FDS request: ``<IIII`` argsz (>= 16), flags, index, count.
    QEMU never sends it; a server may answer it with an error."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    argsz: int
    flags: int
    index: int
    count: int = 0

    def encode(self) -> bytes:
        return _U32X4.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_REGION_IO_FDS")
        if len(body) < REGION_IO_FDS_ARGSZ:
            _fail(f"DEVICE_GET_REGION_IO_FDS body of {len(body)} bytes, "
                  f"needs {REGION_IO_FDS_ARGSZ}")
        fields = _U32X4.unpack_from(body)
        if fields[0] < REGION_IO_FDS_ARGSZ:
            _fail(f"DEVICE_GET_REGION_IO_FDS argsz {fields[0]} below {REGION_IO_FDS_ARGSZ}")
        return cls(*fields)


@fast_init
@dataclass(frozen=True, slots=True)
class SubRegionIoFd:
    """One 40-byte sub-region entry: ``<QQIIIIQ`` offset, size, fd_index, type (0
    ioeventfd, 1 ioregionfd), flags, padding, datamatch / user_data."""

    offset: int
    size: int
    fd_index: int
    io_type: int
    flags: int
    datamatch: int

    def encode(self) -> bytes:
        return _SUB_REGION.pack(self.offset, self.size, self.fd_index, self.io_type,
                                self.flags, 0, self.datamatch)


@fast_init
@dataclass(frozen=True, slots=True)
class RegionIoFdsReply(Message):
    """DEVICE_GET_REGION_IO_FDS reply: the 16-byte request echo (``count`` = total number
    of sub-regions), then as many 40-byte :class:`SubRegionIoFd` as fit in argsz, plus
    the fds they index."""

    HAS_FDS: ClassVar[bool] = True
    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    IS_REPLY: ClassVar[bool] = True
    argsz: int
    flags: int
    index: int
    count: int
    sub_regions: tuple[SubRegionIoFd, ...] = ()
    fds: Fds = ()

    def encode(self) -> bytes:
        head = _U32X4.pack(self.argsz, self.flags, self.index, self.count)
        return head + b"".join(s.encode() for s in self.sub_regions)

    def attached_fds(self) -> Fds:
        return self.fds

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        if len(body) < REGION_IO_FDS_ARGSZ:
            _fail(f"DEVICE_GET_REGION_IO_FDS reply of {len(body)} bytes, "
                  f"needs {REGION_IO_FDS_ARGSZ}")
        argsz, flags, index, count = _U32X4.unpack_from(body)
        rest = len(body) - REGION_IO_FDS_ARGSZ
        if rest % REGION_IO_FDS_ENTRY:
            _fail("DEVICE_GET_REGION_IO_FDS reply has a partial sub-region entry")
        if rest // REGION_IO_FDS_ENTRY > count:
            _fail("DEVICE_GET_REGION_IO_FDS reply has more entries than its count")
        subs = []
        for off, size, fd_index, io_type, sflags, _pad, datamatch in _SUB_REGION.iter_unpack(
            body[REGION_IO_FDS_ARGSZ:]
        ):
            if fd_index >= len(fds):
                _fail(f"sub-region fd_index {fd_index} but only {len(fds)} fds")
            subs.append(SubRegionIoFd(off, size, fd_index, io_type, sflags, datamatch))
        return cls(argsz, flags, index, count, tuple(subs), tuple(fds))


# --------------------------------------------------------------- DEVICE_GET_IRQ_INFO


@fast_init
@dataclass(frozen=True, slots=True)
class _IrqInfoBody(Message):
    """DEVICE_GET_IRQ_INFO request and reply: ``<IIII``.

    ====== ==== ===== ==================================================
    offset size field notes
    ====== ==== ===== ==================================================
    0      4    argsz >= 16
    4      4    flags EVENTFD 0x1, MASKABLE 0x2, AUTOMASKED 0x4, NORESIZE 0x8
    8      4    index IRQ type (INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4)
    12     4    count vectors of that type (reply)
    ====== ==== ===== ==================================================
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    argsz: int
    flags: int
    index: int
    count: int = 0

    def encode(self) -> bytes:
        return _U32X4.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO")
        if len(body) < IRQ_INFO_ARGSZ:
            _fail(f"DEVICE_GET_IRQ_INFO body of {len(body)} bytes, needs {IRQ_INFO_ARGSZ}")
        fields = _U32X4.unpack_from(body)
        if fields[0] < IRQ_INFO_ARGSZ:
            _fail(f"DEVICE_GET_IRQ_INFO argsz {fields[0]} below {IRQ_INFO_ARGSZ}")
        return cls(*fields)


@fast_init
@dataclass(frozen=True, slots=True)
class IrqInfoRequest(_IrqInfoBody):
    pass


@fast_init
@dataclass(frozen=True, slots=True)
class IrqInfoReply(_IrqInfoBody):
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------------ DEVICE_SET_IRQS

_SET_IRQS = struct.Struct("<IIIII")


@fast_init
@dataclass(frozen=True, slots=True)
class SetIrqsRequest(Message):
    """DEVICE_SET_IRQS request: ``<IIIII`` then, with DATA_BOOL only, one byte per vector.

    ====== ==== ===== =========================================================
    offset size field notes
    ====== ==== ===== =========================================================
    0      4    argsz >= 20 and <= body length; >= 20 + count with DATA_BOOL
    4      4    flags exactly one DATA bit (NONE 0x1, BOOL 0x2, EVENTFD 0x4) and
                      one ACTION bit (MASK 0x8, UNMASK 0x10, TRIGGER 0x20)
    8      4    index IRQ type
    12     4    start first vector; start + count must not wrap 2^32
    16     4    count 0 only as "disable all": DATA_NONE|TRIGGER, start 0
    20     var  data  DATA_BOOL: ``count`` bytes
    ====== ==== ===== =========================================================

    fds: with DATA_EVENTFD exactly ``count`` (install) or none (de-assign, QEMU's "-1"
    entries); with DATA_NONE/DATA_BOOL none at all.
    """

    HAS_FDS: ClassVar[bool] = True
    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    fds: Fds = ()
    bools: tuple[bool, ...] | None = None

    def encode(self) -> bytes:
        head = _SET_IRQS.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return head if self.bools is None else head + bytes(self.bools)

    def attached_fds(self) -> Fds:
        return self.fds

    @property
    def data_type(self) -> SetIrqsFlags:
        return SetIrqsFlags(self.flags & SET_IRQS_DATA_MASK)

    @property
    def action(self) -> SetIrqsFlags:
        return SetIrqsFlags(self.flags & SET_IRQS_ACTION_MASK)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        if len(body) < SET_IRQS_ARGSZ:
            _fail(f"DEVICE_SET_IRQS body of {len(body)} bytes, needs {SET_IRQS_ARGSZ}")
        argsz, flags, index, start, count = _SET_IRQS.unpack_from(body)
        if argsz < SET_IRQS_ARGSZ:
            _fail(f"DEVICE_SET_IRQS argsz {argsz} below {SET_IRQS_ARGSZ}")
        if len(body) < argsz:
            _fail(f"DEVICE_SET_IRQS body of {len(body)} bytes is shorter than argsz {argsz}")
        if flags & ~SET_IRQS_KNOWN_FLAGS:
            _fail(f"DEVICE_SET_IRQS unknown flags {flags:#x}")
        data = flags & SET_IRQS_DATA_MASK
        action = flags & SET_IRQS_ACTION_MASK
        if data.bit_count() != 1:
            _fail(f"DEVICE_SET_IRQS needs exactly one DATA flag, flags {flags:#x}")
        if action.bit_count() != 1:
            _fail(f"DEVICE_SET_IRQS needs exactly one ACTION flag, flags {flags:#x}")
        if start + count > U32_LIMIT:
            _fail("DEVICE_SET_IRQS start + count wraps around 2^32")
        if count == 0 and (
            data != SetIrqsFlags.DATA_NONE or action != SetIrqsFlags.ACTION_TRIGGER or start
        ):
            _fail("DEVICE_SET_IRQS count 0 is only valid as DATA_NONE|TRIGGER with start 0")
        bools: tuple[bool, ...] | None = None
        if data == SetIrqsFlags.DATA_EVENTFD:
            if fds and len(fds) != count:
                _fail(f"DEVICE_SET_IRQS DATA_EVENTFD with {len(fds)} fds for count {count}")
        else:
            _no_fds(fds, "DEVICE_SET_IRQS without DATA_EVENTFD")
            if data == SetIrqsFlags.DATA_BOOL:
                if argsz < SET_IRQS_ARGSZ + count:
                    _fail(f"DEVICE_SET_IRQS DATA_BOOL needs {count} data bytes, "
                          f"argsz {argsz} has {argsz - SET_IRQS_ARGSZ}")
                bools = tuple(b != 0 for b in body[SET_IRQS_ARGSZ:SET_IRQS_ARGSZ + count])
        return cls(argsz, flags, index, start, count, tuple(fds), bools)


@fast_init
@dataclass(frozen=True, slots=True)
class SetIrqsReply(_EmptyBody):
    """DEVICE_SET_IRQS reply: empty body."""

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    IS_REPLY: ClassVar[bool] = True


# ----------------------------------------------------------- REGION_READ / REGION_WRITE
#
# The hot path: a guest MMIO read is one REGION_READ round trip while the vCPU waits.
# Decoding is one precompiled unpack, a few integer compares and one dataclass init.

_REGION_ACCESS = struct.Struct("<QII")
_ra_pack = _REGION_ACCESS.pack
_ra_unpack_from = _REGION_ACCESS.unpack_from


@fast_init
@dataclass(frozen=True, slots=True)
class RegionReadRequest(Message):
    """REGION_READ request: ``<QII`` offset, region, count; exactly 16 bytes, no data.

    ``max_count`` (the negotiated ``max_data_xfer_size``) is passed by the connection.
    """

    COMMAND: ClassVar[Command] = Command.REGION_READ
    offset: int
    region: int
    count: int

    def encode(self) -> bytes:
        return _ra_pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), max_count: int = U32_MAX) -> Self:
        if len(body) != REGION_ACCESS_FIXED:
            _fail(f"REGION_READ body of {len(body)} bytes, must be {REGION_ACCESS_FIXED}")
        if fds:
            _fail("REGION_READ takes no fds")
        offset, region, count = _ra_unpack_from(body)
        if offset + count > U64_LIMIT:
            _fail("REGION_READ offset + count wraps around 2^64")
        if count > max_count:
            _fail(f"REGION_READ count {count} above max_data_xfer_size {max_count}")
        return cls(offset, region, count)


@fast_init
@dataclass(frozen=True, slots=True)
class RegionReadReply(Message):
    """REGION_READ reply: ``<QII`` offset, region, count (echoes) then exactly ``count``
    data bytes (QEMU refuses a longer reply with E2BIG)."""

    COMMAND: ClassVar[Command] = Command.REGION_READ
    IS_REPLY: ClassVar[bool] = True
    offset: int
    region: int
    count: int
    data: BytesLike

    def encode(self) -> bytes:
        if len(self.data) != self.count:
            raise LocalProtocolError(
                f"REGION_READ reply with {len(self.data)} data bytes for count {self.count}"
            )
        return _ra_pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "REGION_READ reply")
        if len(body) < REGION_ACCESS_FIXED:
            _fail(f"REGION_READ reply of {len(body)} bytes, needs {REGION_ACCESS_FIXED}")
        offset, region, count = _ra_unpack_from(body)
        if len(body) - REGION_ACCESS_FIXED != count:
            _fail(f"REGION_READ reply has {len(body) - REGION_ACCESS_FIXED} data bytes "
                  f"for count {count}")
        return cls(offset, region, count, body[REGION_ACCESS_FIXED:])


@fast_init
@dataclass(frozen=True, slots=True)
class RegionWriteRequest(Message):
    """REGION_WRITE request: ``<QII`` offset, region, count, then exactly ``count`` bytes.

    ``data`` is a memoryview slice of the received message (no copy) when the connection
    decodes it; it stays valid as long as the message object lives.
    """

    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    offset: int
    region: int
    count: int
    data: BytesLike

    def encode(self) -> bytes:
        if len(self.data) != self.count:
            raise LocalProtocolError(
                f"REGION_WRITE with {len(self.data)} data bytes for count {self.count}"
            )
        return _ra_pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), max_count: int = U32_MAX) -> Self:
        size = len(body)
        if size < REGION_ACCESS_FIXED:
            _fail(f"REGION_WRITE body of {size} bytes, needs {REGION_ACCESS_FIXED}")
        if fds:
            _fail("REGION_WRITE takes no fds")
        offset, region, count = _ra_unpack_from(body)
        if size - REGION_ACCESS_FIXED != count:
            _fail(f"REGION_WRITE has {size - REGION_ACCESS_FIXED} data bytes for count {count}")
        if offset + count > U64_LIMIT:
            _fail("REGION_WRITE offset + count wraps around 2^64")
        if count > max_count:
            _fail(f"REGION_WRITE count {count} above max_data_xfer_size {max_count}")
        return cls(offset, region, count, body[REGION_ACCESS_FIXED:])


@fast_init
@dataclass(frozen=True, slots=True)
class RegionWriteReply(Message):
    """REGION_WRITE reply: ``<QII`` offset, region, count echoed; no data."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    IS_REPLY: ClassVar[bool] = True
    offset: int
    region: int
    count: int

    def encode(self) -> bytes:
        return _ra_pack(self.offset, self.region, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "REGION_WRITE reply")
        if len(body) != REGION_ACCESS_FIXED:
            _fail(f"REGION_WRITE reply of {len(body)} bytes, must be {REGION_ACCESS_FIXED}")
        return cls(*_ra_unpack_from(body))


# -------------------------------------------------------- DMA_READ / DMA_WRITE (S -> C)

_DMA_QEMU = struct.Struct("<QI")
_DMA_SPEC = struct.Struct("<QQ")
_QEMU_DATA = _DMA_QEMU.size  # 12: where QEMU's data starts
_QEMU_PAD = b"\0" * (DMA_RW_FIXED - _QEMU_DATA)  # struct padding QEMU counts in its size


class _DmaMessage(Message):
    """Base of the four DMA_READ/DMA_WRITE messages; their layout depends on
    :class:`DmaLayout`, so ``encode``/``decode`` take it as an argument."""

    __slots__ = ()
    LAYOUT_DEPENDENT: ClassVar[bool] = True

    def encode(self, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), layout: DmaLayout = DmaLayout.QEMU) -> Self:
        raise NotImplementedError


def _dma_head(body: BytesLike, layout: DmaLayout, what: str) -> tuple[int, int]:
    if len(body) < DMA_RW_FIXED:
        _fail(f"{what} body of {len(body)} bytes, needs {DMA_RW_FIXED}")
    head = _DMA_QEMU if layout is DmaLayout.QEMU else _DMA_SPEC
    address, count = head.unpack_from(body)
    if address + count > U64_LIMIT:
        _fail(f"{what} address + count wraps around 2^64")
    return address, count


def _dma_pack(layout: DmaLayout, address: int, count: int, data: BytesLike = b"") -> bytes:
    if layout is DmaLayout.QEMU:
        return b"".join((_DMA_QEMU.pack(address, count), data, _QEMU_PAD))
    return _DMA_SPEC.pack(address, count) + data


@fast_init
@dataclass(frozen=True, slots=True)
class DmaReadRequest(_DmaMessage):
    """DMA_READ request (server → client): read ``count`` bytes of guest memory.
    Body is 16 bytes in both layouts (QEMU: ``<QI`` + 4 padding; spec: ``<QQ``)."""

    COMMAND: ClassVar[Command] = Command.DMA_READ
    address: int
    count: int

    def encode(self, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
        return _dma_pack(layout, self.address, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), layout: DmaLayout = DmaLayout.QEMU) -> Self:
        _no_fds(fds, "DMA_READ")
        return cls(*_dma_head(body, layout, "DMA_READ"))


@fast_init
@dataclass(frozen=True, slots=True)
class DmaReadReply(_DmaMessage):
    """DMA_READ reply: the request's address and count, then ``count`` bytes (QEMU: data
    @12 followed by 4 padding bytes; spec: data @16)."""

    COMMAND: ClassVar[Command] = Command.DMA_READ
    IS_REPLY: ClassVar[bool] = True
    address: int
    count: int
    data: BytesLike

    def encode(self, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
        if len(self.data) != self.count:
            raise LocalProtocolError(f"DMA_READ reply with {len(self.data)} bytes for "
                                     f"count {self.count}")
        return _dma_pack(layout, self.address, self.count, self.data)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), layout: DmaLayout = DmaLayout.QEMU) -> Self:
        _no_fds(fds, "DMA_READ reply")
        address, count = _dma_head(body, layout, "DMA_READ reply")
        if layout is DmaLayout.QEMU:
            extra = len(body) - _QEMU_DATA - count
            if not 0 <= extra <= len(_QEMU_PAD):
                _fail(f"DMA_READ reply of {len(body)} bytes for count {count}")
            return cls(address, count, body[_QEMU_DATA:_QEMU_DATA + count])
        if len(body) - DMA_RW_FIXED != count:
            _fail(f"DMA_READ reply has {len(body) - DMA_RW_FIXED} data bytes for count {count}")
        return cls(address, count, body[DMA_RW_FIXED:])


@fast_init
@dataclass(frozen=True, slots=True)
class DmaWriteRequest(_DmaMessage):
    """DMA_WRITE request (server → client): write ``data`` to guest memory.
    QEMU: ``<QI`` + data + 4 padding (QEMU checks ``count <= size - 32``: E2BIG);
    spec: ``<QQ`` + data."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    address: int
    count: int
    data: BytesLike

    def encode(self, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
        if len(self.data) != self.count:
            raise LocalProtocolError(f"DMA_WRITE with {len(self.data)} bytes for "
                                     f"count {self.count}")
        return _dma_pack(layout, self.address, self.count, self.data)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), layout: DmaLayout = DmaLayout.QEMU) -> Self:
        _no_fds(fds, "DMA_WRITE")
        address, count = _dma_head(body, layout, "DMA_WRITE")
        if layout is DmaLayout.QEMU:
            if count > len(body) - DMA_RW_FIXED:
                _fail(f"DMA_WRITE count {count} larger than its data", E2BIG)
            return cls(address, count, body[_QEMU_DATA:_QEMU_DATA + count])
        if len(body) - DMA_RW_FIXED != count:
            _fail(f"DMA_WRITE has {len(body) - DMA_RW_FIXED} data bytes for count {count}")
        return cls(address, count, body[DMA_RW_FIXED:])


@fast_init
@dataclass(frozen=True, slots=True)
class DmaWriteReply(_DmaMessage):
    """DMA_WRITE reply. QEMU sends the header only, so in the QEMU layout the body is
    empty and ``decode`` yields address = count = 0; the connection fills both in from the
    request it answers. Spec: ``<QQ`` (libvfio-user) or ``<QI`` (the spec's table)."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    IS_REPLY: ClassVar[bool] = True
    address: int
    count: int

    def encode(self, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
        if layout is DmaLayout.QEMU:
            return b""
        return _DMA_SPEC.pack(self.address, self.count)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = (), layout: DmaLayout = DmaLayout.QEMU) -> Self:
        _no_fds(fds, "DMA_WRITE reply")
        if layout is DmaLayout.QEMU:
            if len(body):
                _fail(f"DMA_WRITE reply has a {len(body)}-byte body, QEMU sends none")
            return cls(0, 0)
        if len(body) == DMA_RW_FIXED:
            return cls(*_DMA_SPEC.unpack(body))
        if len(body) == _QEMU_DATA:
            return cls(*_DMA_QEMU.unpack(body))
        _fail(f"DMA_WRITE reply of {len(body)} bytes")


# --------------------------------------------------------------------- DEVICE_RESET


@fast_init
@dataclass(frozen=True, slots=True)
class DeviceResetRequest(_EmptyBody):
    """DEVICE_RESET request: empty body. Reply only once the reset is complete."""

    COMMAND: ClassVar[Command] = Command.DEVICE_RESET


@fast_init
@dataclass(frozen=True, slots=True)
class DeviceResetReply(_EmptyBody):
    COMMAND: ClassVar[Command] = Command.DEVICE_RESET
    IS_REPLY: ClassVar[bool] = True


# ------------------------------------------------------------ DIRTY_PAGES (retired)

_DIRTY = struct.Struct("<II")


@fast_init
@dataclass(frozen=True, slots=True)
class _DirtyPagesBody(Message):
    """DIRTY_PAGES (retired, migration v1): ``<II`` argsz (>= 8), flags; whatever follows
    is ignored. Decoded only so that it can be refused with a precise errno."""

    COMMAND: ClassVar[Command] = Command.DIRTY_PAGES
    argsz: int
    flags: int

    def encode(self) -> bytes:
        return _DIRTY.pack(self.argsz, self.flags)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "DIRTY_PAGES")
        if len(body) < DIRTY_PAGES_FIXED:
            _fail(f"DIRTY_PAGES body of {len(body)} bytes, needs {DIRTY_PAGES_FIXED}")
        argsz, flags = _DIRTY.unpack_from(body)
        if argsz < DIRTY_PAGES_FIXED:
            _fail(f"DIRTY_PAGES argsz {argsz} below {DIRTY_PAGES_FIXED}")
        return cls(argsz, flags)


@fast_init
@dataclass(frozen=True, slots=True)
class DirtyPagesRequest(_DirtyPagesBody):
    pass


@fast_init
@dataclass(frozen=True, slots=True)
class DirtyPagesReply(_DirtyPagesBody):
    IS_REPLY: ClassVar[bool] = True


# --------------------------------------------------------------- REGION_WRITE_MULTI

_WR_CNT = struct.Struct("<Q")
_WR_ONE = struct.Struct("<QII8s")


@fast_init
@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    """One 24-byte entry: ``<QII8s`` offset, region, count (<= 8), data (first ``count``
    bytes meaningful; ``data`` here holds exactly those)."""

    offset: int
    region: int
    count: int
    data: bytes

    def encode(self) -> bytes:
        if len(self.data) != self.count or self.count > WRITE_MULTI_MAX_DATA:
            raise LocalProtocolError(f"WRITE_MULTI entry with {len(self.data)} bytes for "
                                     f"count {self.count}")
        return _WR_ONE.pack(self.offset, self.region, self.count, self.data)


@fast_init
@dataclass(frozen=True, slots=True)
class RegionWriteMultiRequest(Message):
    """REGION_WRITE_MULTI (posted, NO_REPLY): ``<Q`` wr_cnt (1..200) followed by exactly
    wr_cnt 24-byte :class:`WriteMultiEntry`. Apply the entries in order."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    entries: tuple[WriteMultiEntry, ...]

    def encode(self) -> bytes:
        return _WR_CNT.pack(len(self.entries)) + b"".join(e.encode() for e in self.entries)

    @classmethod
    def decode(cls, body: BytesLike, fds: Fds = ()) -> Self:
        _no_fds(fds, "REGION_WRITE_MULTI")
        if len(body) < _WR_CNT.size:
            _fail(f"REGION_WRITE_MULTI body of {len(body)} bytes, needs {_WR_CNT.size}")
        (wr_cnt,) = _WR_CNT.unpack_from(body)
        if not 1 <= wr_cnt <= WRITE_MULTI_MAX_ENTRIES:
            _fail(f"REGION_WRITE_MULTI wr_cnt {wr_cnt} outside 1..{WRITE_MULTI_MAX_ENTRIES}")
        if len(body) != _WR_CNT.size + wr_cnt * WRITE_MULTI_ENTRY:
            _fail(f"REGION_WRITE_MULTI body of {len(body)} bytes for wr_cnt {wr_cnt}")
        entries = []
        for offset, region, count, data in _WR_ONE.iter_unpack(body[_WR_CNT.size:]):
            if count > WRITE_MULTI_MAX_DATA:
                _fail(f"REGION_WRITE_MULTI entry count {count} above {WRITE_MULTI_MAX_DATA}")
            if offset + count > U64_LIMIT:
                _fail("REGION_WRITE_MULTI entry offset + count wraps around 2^64")
            entries.append(WriteMultiEntry(offset, region, count, data[:count]))
        return cls(tuple(entries))


@fast_init
@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(_EmptyBody):
    """REGION_WRITE_MULTI reply: empty body (only sent if the request lacked NO_REPLY)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    IS_REPLY: ClassVar[bool] = True

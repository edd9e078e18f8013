"""Numbers of the vfio-user wire protocol, as QEMU's ``vfio-user-pci`` speaks them.

Every value here is part of the wire format (the specification in QEMU's
``docs/interop/vfio-user.rst`` and the kernel VFIO uapi it borrows from), so
they are declared once and imported everywhere else.
"""

from __future__ import annotations

import enum
import errno
import struct

HEADER_SIZE = 16
"""Every message starts with a 16-byte header:
id u16, command u16, size u32, flags u32, error u32."""

HEADER_STRUCT = struct.Struct("<HHIII")

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 0


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class MessageType(enum.IntEnum):
    """Bits 0-3 of the header flags."""

    COMMAND = 0x0
    REPLY = 0x1


class HeaderFlags(enum.IntFlag):
    TYPE_MASK = 0x0F
    NO_REPLY = 0x10
    ERROR = 0x20


class RegionIndex(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class DeviceInfoFlags(enum.IntFlag):
    RESET = 0x1
    PCI = 0x2


class RegionInfoFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class RegionCapabilityId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


class SetIrqsFlags(enum.IntFlag):
    DATA_NONE = 0x01
    DATA_BOOL = 0x02
    DATA_EVENTFD = 0x04
    ACTION_MASK = 0x08
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20

    DATA_MASK = 0x07
    ACTION_MASK_BITS = 0x38


class DmaMapFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 0x1
    UNMAP_ALL = 0x2


# Fixed body sizes (bytes after the header) of the requests the server accepts.
VERSION_FIXED = 4
DMA_MAP_ARGSZ = 32
DMA_UNMAP_ARGSZ = 24
DEVICE_INFO_ARGSZ = 16
REGION_INFO_ARGSZ = 32
REGION_IO_FDS_ARGSZ = 16
IRQ_INFO_ARGSZ = 16
SET_IRQS_ARGSZ = 20
REGION_ACCESS_FIXED = 16
WRITE_MULTI_ENTRY = 24
WRITE_MULTI_MAX_ENTRIES = 200
WRITE_MULTI_MAX_DATA = 8

# Limits this server advertises and enforces.
DEFAULT_MAX_MSG_FDS = 8
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_PGSIZES = 4096
DEFAULT_MAX_DMA_MAPS = 65535
MAX_MSG_FDS_LIMIT = 1024
MAX_VERSION_JSON = 4096
"""Capability strings above this are refused: no real client needs more, and
the cap keeps a hostile length from costing memory."""

# Errno values used in error replies; named here so tests and code agree.
EINVAL = errno.EINVAL
ENOENT = errno.ENOENT
EEXIST = errno.EEXIST
ENOSPC = errno.ENOSPC
ENOTSUP = errno.EOPNOTSUPP
ENOSYS = errno.ENOSYS
EFAULT = errno.EFAULT
E2BIG = errno.E2BIG
EPERM = errno.EPERM
EBUSY = errno.EBUSY
EIO = errno.EIO
ENODEV = errno.ENODEV
ETIMEDOUT = errno.ETIMEDOUT

# --- Added with the sans-io core (vmsi_server/protocol/{messages,connection}.py) ---

U32_LIMIT = 1 << 32
"""One past the largest u32: ``start + count`` of SET_IRQS must not reach it."""
U64_LIMIT = 1 << 64
"""One past the largest u64: ``offset + count`` / ``address + size`` must not reach it."""

MESSAGE_TYPE_MASK = 0x0F
NO_REPLY = 0x10
ERROR_FLAG = 0x20
KNOWN_HEADER_FLAGS = MESSAGE_TYPE_MASK | NO_REPLY | ERROR_FLAG

SET_IRQS_KNOWN_FLAGS = 0x3F
"""DATA_NONE|DATA_BOOL|DATA_EVENTFD|ACTION_MASK|ACTION_UNMASK|ACTION_TRIGGER."""
SET_IRQS_DATA_MASK = 0x07
SET_IRQS_ACTION_MASK = 0x38

DIRTY_PAGES_FIXED = 8
"""argsz u32 + flags u32: all the retired DIRTY_PAGES body we decode before refusing it."""
REGION_IO_FDS_ENTRY = 40
DMA_RW_FIXED = 16
"""Fixed part of a DMA_READ/DMA_WRITE body in both layouts: spec (u64 address, u64 count)
and QEMU (u64 address, u32 count, then data at 12 and 4 bytes of struct padding at the end,
because QEMU's ``sizeof(VFIOUserDMARW)`` is 32 and it checks ``size >= 32 + count``)."""

QEMU_MAX_MSG_FDS = 16
"""QEMU refuses a server ``max_msg_fds`` above this ("malformed max_msg_fds")."""
QEMU_MAX_DATA_XFER_SIZE = 64 << 20
"""QEMU refuses a server ``max_data_xfer_size`` above this (VFIO_USER_MAX_MAX_XFER)."""
SPEC_DEFAULT_MAX_MSG_FDS = 1
"""The specification's default for an absent ``max_msg_fds``; QEMU assumes 8 instead."""
MIN_DATA_XFER_SIZE = 4096
"""QEMU reads the whole (PCIe) config space in one REGION_READ and refuses locally any
read above the server's limit, so a server limit below 4 KiB breaks realize."""

PRE_VERSION_MAX_MESSAGE = HEADER_SIZE + VERSION_FIXED + MAX_VERSION_JSON + 1
"""Largest message accepted before VERSION: the largest legal VERSION request."""

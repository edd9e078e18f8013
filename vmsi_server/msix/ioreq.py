"""The ioreq channel between the fast path and the slow-path worker.

Modelled on Xen's ioreq ring between the hypervisor and qemu-dm: fixed-size
binary records, one request and one response per forwarded access, over a
``SOCK_SEQPACKET`` socketpair (message boundaries kept by the kernel, so one
``send`` and one ``recv`` per record).

Request (24 bytes, little endian)::

    offset  size  field
    0       4     seq        echoed in the response
    4       1     op         ``Op``
    5       1     (pad)
    6       2     function   several VFs share one worker
    8       4     offset     table/PBA byte offset, or the first vector (IRQ_UPDATE)
    12      4     size       access size, or the vector count (IRQ_UPDATE)
    16      8     data       write value / the fast path's state the op needs

Response (16 bytes)::

    0       4     seq
    4       4     status     0, or a positive errno
    8       8     data       read value

What ``data`` carries per op:

* TABLE_READ: the fast path's Vector Control DWORD of the entry. The fast path
  owns the mask bits (as 2015 Xen took mask state from the guest's view), so
  the worker composes the answer from its own address/data and this value.
* TABLE_WRITE: the value written.
* PBA_READ: the fast path's pending bits (QWORD at the request's offset & ~7):
  triggers happen in the I/O process, so the worker cannot know them.
* CONTROL_CHANGED: bit 0 MSI-X Enable, bit 1 Function Mask.
* IRQ_UPDATE: bits 7:0 the SET_IRQS flags, bit 8 eventfds were handed over
  (an EVENTFD request without them de-assigns), bits 63:16 which of the
  vectors ``offset..offset+size-1`` the request selected (the first 48).
* FUNCTION_ADD: the number of vectors.
* FAULT: a ``FaultHook`` (honoured only when the worker was started with
  test hooks enabled).
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

REQUEST = struct.Struct("<IBxHIIQ")
RESPONSE = struct.Struct("<IiQ")
assert REQUEST.size == 24 and RESPONSE.size == 16

IRQ_FDS_PRESENT = 1 << 8
IRQ_SELECTED_SHIFT = 16

READY_SEQ = 0
"""The worker announces itself with a response of this seq (data = its pid)."""

FAULT_HOOKS_ENV = "VMSI_SLOWPATH_FAULT_HOOKS"


class Op(enum.IntEnum):
    PING = 0
    FUNCTION_ADD = 1
    FUNCTION_REMOVE = 2
    TABLE_READ = 3
    TABLE_WRITE = 4
    PBA_READ = 5
    PBA_WRITE = 6
    CONTROL_CHANGED = 7
    IRQ_UPDATE = 8
    RESET = 9
    STATS = 10
    FAULT = 11


class FaultHook(enum.IntEnum):
    HANG_NOW = 1
    """Stop answering, starting with this request."""
    EXIT_NOW = 2
    """Exit without answering."""
    HANG_NEXT = 3
    """Answer this request, then hang on the next one (a hang mid-access)."""


class Request(NamedTuple):
    seq: int
    op: int
    function: int
    offset: int
    size: int
    data: int


class Response(NamedTuple):
    seq: int
    status: int
    data: int


def encode_request(
    seq: int, op: int, function: int, offset: int = 0, size: int = 0, data: int = 0
) -> bytes:
    return REQUEST.pack(seq, op, function, offset, size, data)


def decode_request(record: bytes) -> Request:
    return Request._make(REQUEST.unpack(record))


def encode_response(seq: int, status: int, data: int = 0) -> bytes:
    return RESPONSE.pack(seq, status, data)


def decode_response(record: bytes) -> Response:
    return Response._make(RESPONSE.unpack(record))

"""Errors of the guest-memory layer.

They carry a positive errno because DMA_MAP / DMA_UNMAP failures become vfio-user
error replies verbatim (protocol §9.1), so the dispatcher can reply with
``exc.errno`` without a translation table.
"""

from __future__ import annotations

import enum
import errno as _errno

MEMFD_HINT = (
    "give the guest shared, fd-backed RAM, e.g. "
    "-object memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem"
)
"""The fix for DmaNotAccessible, kept in one place so the log and the exception agree."""


class DmaError(Exception):
    """A guest-memory operation failed; ``errno`` is what the client should see.

    Deliberately not an ``OSError``: transport code that treats ``OSError`` as
    "the socket is gone" must not swallow a guest-triggered fault by accident.
    """

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.reason}"


class DmaNotAccessible(DmaError):
    """The access hit guest memory that QEMU mapped without an fd.

    A separate class because this is a configuration error of the VM (RAM not in
    a shared backend), not a guest bug, and the operator needs the fix spelt out.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(_errno.EFAULT, f"{reason}; {MEMFD_HINT}")


class FaultKind(enum.StrEnum):
    """Keys of ``GuestMemory.faults``; stable strings so telemetry can export them."""

    UNMAPPED = "unmapped"
    """No mapping contains the first byte."""
    OUT_OF_BOUNDS = "out_of_bounds"
    """Starts inside a mapping but runs past its end (also: straddles two mappings)."""
    WRAP = "wrap"
    """Negative address, or address + length beyond 2**64."""
    BAD_LENGTH = "bad_length"
    """Negative length: a caller bug rather than a guest one."""
    NOT_ACCESSIBLE = "not_accessible"
    """Inside a mapping that arrived without an fd."""
    READ_ONLY = "read_only"
    """A write (or writable view) of a mapping QEMU marked read-only."""

"""Windows: parts of a region whose accesses a device answers from plain memory.

A device offers a window when reading the range has no side effect and the
bytes the guest would get are exactly a buffer the device keeps current (and
writes only in place). The compiled fast lane (``vmsi_server.fastlane``)
answers such reads without calling the device; without the lane they go
through ``PciFunction.read`` as always, so a window must never change what a
read returns, only who answers it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from vmsi_server.telemetry.counters import AccessStat


class WindowMode(enum.IntEnum):
    """How the lane checks an access and which stat it counts (values shared with lane.h)."""

    BYTES = 0
    """Any size and alignment (config space)."""
    MSIX_TABLE = 1
    """Aligned DWORD/QWORD; stats: QWORD, Vector Control, address/data reads."""
    MSIX_PBA = 2
    """Aligned DWORD/QWORD; stats: PBA reads."""


@dataclass(frozen=True, eq=False)
class ReadWindow:
    region: int
    start: int
    buffer: Any
    """A writable buffer (bytearray, array): its bytes are the window's contents."""
    mode: WindowMode = WindowMode.BYTES
    stats: tuple[AccessStat, ...] = ()
    """Where reads served by the lane are counted (one per mode class; may be empty)."""
    timed: bool = False
    """Also time each served read into ``stats`` (``--time-fast-path``)."""

    @property
    def length(self) -> int:
        return memoryview(self.buffer).nbytes


@dataclass(frozen=True, eq=False)
class MaskWindow:
    """An MSI-X table whose Vector Control writes the lane may apply in place.

    Only while ``armed[0]`` is non-zero (the device sets it when the table's
    mask bits are authoritative and their writes stay on the fast path), and
    only a write that needs nothing else: a mask, or an unmask of a vector
    whose bit in ``pending`` is clear. Everything else reaches ``write``.
    """

    region: int
    start: int
    dwords: Any
    """The table as DWORDs (``array('I')``), written in place."""
    pending: Any
    """The PBA's bytes (one bit per vector)."""
    armed: Any
    """``array('I', [0 or 1])``."""
    writable: int
    """Vector Control bits software may write (the rest read as written by the device)."""
    stat: AccessStat
    timed: bool = False

    @property
    def length(self) -> int:
        return memoryview(self.dwords).nbytes


class RuleKind(enum.IntEnum):
    """What a register rule does with a posted DWORD write (values shared with lane.h)."""

    SET_UNLESS_READY = 0
    """``target |= value & mask``, unless ``value & mask & guard``: then the device
    must act (an interrupt enable that finds its cause pending), so Python takes it."""
    CLEAR = 1
    """``target &= ~(value & mask)``: always pure."""


@dataclass(frozen=True, eq=False)
class RegisterRule:
    """A register whose posted writes the lane may apply to ``state`` in place."""

    region: int
    offset: int
    kind: RuleKind
    mask: int
    state: Any
    """``array('q')`` holding the register (and the guard)."""
    target: int
    """Index of the register in ``state``."""
    guard: int = 0
    """Index of the register whose bits send a write to Python (SET_UNLESS_READY)."""

    @property
    def start(self) -> int:
        return self.offset

    @property
    def length(self) -> int:
        return 4

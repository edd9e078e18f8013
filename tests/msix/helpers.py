"""Shared helpers for the MSI-X tests: real eventfds, request builders, accessors."""

from __future__ import annotations

import os

from vmsi_server.msix.controller import MsixController
from vmsi_server.pci.function import IrqRequest, apply_irq_eventfds
from vmsi_server.pci.irq_lines import IrqLines
from vmsi_server.protocol.constants import IrqIndex, SetIrqsFlags

F = SetIrqsFlags
VECTORS = 3
ADDR = 0xFEE0_0000
ENTRY = 16
CONTROL = 12


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def fired(fd: int) -> int:
    """How many times the eventfd was written since the last look (0 = never)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Lines:
    """IrqLines for a 3-vector MSI-X function, with eventfds we can read back.

    IrqLines owns (and closes) the fds it holds; we keep a dup of each to read.
    """

    def __init__(self) -> None:
        self.irqs = IrqLines([1, 0, VECTORS, 1, 1])
        self.readers: dict[int, int] = {}

    def install(self, ctrl: MsixController, *vectors: int) -> IrqRequest:
        """SET_IRQS TRIGGER|EVENTFD for each vector, as the session applies it."""
        last = None
        for v in vectors:
            fd = new_eventfd()
            old = self.readers.pop(v, None)
            if old is not None:
                os.close(old)
            self.readers[v] = os.dup(fd)
            req = IrqRequest(IrqIndex.MSIX, F.ACTION_TRIGGER | F.DATA_EVENTFD, v, 1, (fd,))
            last = apply_irq_eventfds(self.irqs, req)
            ctrl.set_irqs(last)
        assert last is not None
        return last

    def fired(self, vector: int) -> int:
        return fired(self.readers[vector])

    def close(self) -> None:
        self.irqs.close_all()
        for fd in self.readers.values():
            os.close(fd)


def w32(ctrl: MsixController, offset: int, value: int) -> None:
    ctrl.table_write(offset, value.to_bytes(4, "little"))


def w64(ctrl: MsixController, offset: int, value: int) -> None:
    ctrl.table_write(offset, value.to_bytes(8, "little"))


def r32(ctrl: MsixController, offset: int) -> int:
    return int.from_bytes(ctrl.table_read(offset, 4), "little")


def r64(ctrl: MsixController, offset: int) -> int:
    return int.from_bytes(ctrl.table_read(offset, 8), "little")


def pba(ctrl: MsixController) -> int:
    return int.from_bytes(ctrl.pba_read(0, 8), "little")


def unmask(ctrl: MsixController, vector: int) -> None:
    w32(ctrl, vector * ENTRY + CONTROL, 0)


def mask(ctrl: MsixController, vector: int) -> None:
    w32(ctrl, vector * ENTRY + CONTROL, 1)


def irq(flags: F, start: int, count: int, bools: tuple[bool, ...] | None = None) -> IrqRequest:
    return IrqRequest(IrqIndex.MSIX, flags, start, count, (), bools)

"""The slow-path device model: a separate process, the stand-in for qemu-dm.

Run as ``python -m vmsi_server.msix.slowpath_worker --fd N``. It holds the
device-side MSI-X table of every function the server registered and answers
ioreq records (``ioreq.py``) on the inherited socket ``N``, one response per
request, until the channel closes. Its CPU time is what the seed measured as
dom0 CPU, so it does the device-model work of each request (decode, look up or
update the table, encode) and nothing artificial.

It imports only the codec, the table and the layout, to start quickly: the
supervisor restarts it inside a guest's request when it dies.

Fault hooks (``Op.FAULT``) exist for the supervisor's tests; they are honoured
only when the environment has ``VMSI_SLOWPATH_FAULT_HOOKS=1``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable

from vmsi_server.msix.ioreq import (
    FAULT_HOOKS_ENV,
    IRQ_FDS_PRESENT,
    IRQ_SELECTED_SHIFT,
    READY_SEQ,
    REQUEST,
    RESPONSE,
    FaultHook,
    Op,
)
from vmsi_server.msix.layout import ENTRY_SIZE, EntryField
from vmsi_server.msix.table import MsixTable

_CONTROL = EntryField.VECTOR_CONTROL.value
_ACTION_MASK, _ACTION_UNMASK, _ACTION_TRIGGER = 0x08, 0x10, 0x20
_DATA_EVENTFD = 0x04


class FunctionModel:
    """The device-side MSI-X state of one function."""

    __slots__ = ("assigned", "client_masked", "enabled", "function_masked", "table", "vectors")

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.table = MsixTable(vectors)
        self.enabled = False
        self.function_masked = False
        self.client_masked = 0
        self.assigned = 0

    def reset(self) -> None:
        self.table.reset()
        self.enabled = self.function_masked = False
        self.client_masked = self.assigned = 0


class Hang(Exception):
    """Raised by the fault hook to stop answering."""


class Worker:
    def __init__(self, fault_hooks: bool) -> None:
        self.functions: dict[int, FunctionModel] = {}
        self.served = 0
        self.fault_hooks = fault_hooks
        self.hang_next = False
        self.handlers: list[Callable[[int, int, int, int], int]] = [
            self.ping,
            self.function_add,
            self.function_remove,
            self.table_read,
            self.table_write,
            self.pba_read,
            self.pba_write,
            self.control_changed,
            self.irq_update,
            self.reset,
            self.stats,
            self.fault,
        ]
        assert len(self.handlers) == len(Op)

    # -- one request --------------------------------------------------
    def handle(self, record: bytes) -> bytes:
        if len(record) != REQUEST.size:
            return RESPONSE.pack(0, errno.EPROTO, 0)
        seq, op, function, offset, size, data = REQUEST.unpack(record)
        if self.hang_next:
            raise Hang
        self.served += 1
        try:
            value = self.handlers[op](function, offset, size, data)
        except (IndexError, KeyError):  # unknown op or function
            return RESPONSE.pack(seq, errno.EINVAL, 0)
        except _Refused as refused:
            return RESPONSE.pack(seq, refused.errno, 0)
        return RESPONSE.pack(seq, 0, value)

    # -- ops: (function, offset, size, data) -> response data -----------
    def ping(self, function: int, offset: int, size: int, data: int) -> int:
        return data

    def function_add(self, function: int, offset: int, size: int, data: int) -> int:
        if not 1 <= data <= 2048:
            raise _Refused(errno.EINVAL)
        self.functions[function] = FunctionModel(data)
        return 0

    def function_remove(self, function: int, offset: int, size: int, data: int) -> int:
        del self.functions[function]
        return 0

    def table_read(self, function: int, offset: int, size: int, data: int) -> int:
        table = self._table_access(function, offset, size).table
        index = offset >> 2
        if size == 4:
            return (data & 0xFFFFFFFF) if index & 3 == _CONTROL else table.read_dword(index)
        if index & 3 == 2:  # QWORD at +8: data, then the control the fast path owns
            return table.read_dword(index) | ((data & 0xFFFFFFFF) << 32)
        return table.read(offset, 8)

    def table_write(self, function: int, offset: int, size: int, data: int) -> int:
        self._table_access(function, offset, size).table.write(offset, size, data)
        return 0

    def pba_read(self, function: int, offset: int, size: int, data: int) -> int:
        model = self.functions[function]
        if size not in (4, 8) or offset % size or offset + size > ((model.vectors + 63) // 64) * 8:
            raise _Refused(errno.EINVAL)
        return (data >> ((offset & 7) * 8)) & ((1 << (size * 8)) - 1)

    def pba_write(self, function: int, offset: int, size: int, data: int) -> int:
        if function not in self.functions:  # the PBA is read-only: nothing else to do
            raise KeyError(function)
        return 0

    def control_changed(self, function: int, offset: int, size: int, data: int) -> int:
        model = self.functions[function]
        model.enabled = bool(data & 1)
        model.function_masked = bool(data & 2)
        return 0

    def irq_update(self, function: int, offset: int, size: int, data: int) -> int:
        model = self.functions[function]
        flags = data & 0xFF
        selected = (data >> IRQ_SELECTED_SHIFT) << offset
        if flags & _ACTION_MASK:
            model.client_masked |= selected
        elif flags & _ACTION_UNMASK:
            model.client_masked &= ~selected
        elif flags & _ACTION_TRIGGER and flags & _DATA_EVENTFD:
            if data & IRQ_FDS_PRESENT:
                model.assigned |= selected
            else:
                model.assigned &= ~selected
        elif flags & _ACTION_TRIGGER and size == 0:
            model.assigned = 0
        return 0

    def reset(self, function: int, offset: int, size: int, data: int) -> int:
        self.functions[function].reset()
        return 0

    def stats(self, function: int, offset: int, size: int, data: int) -> int:
        return self.served

    def fault(self, function: int, offset: int, size: int, data: int) -> int:
        if not self.fault_hooks:
            raise _Refused(errno.EPERM)
        if data == FaultHook.HANG_NOW:
            raise Hang
        if data == FaultHook.EXIT_NOW:
            os._exit(3)
        if data == FaultHook.HANG_NEXT:
            self.hang_next = True
            return 0
        raise _Refused(errno.EINVAL)

    # -- helpers ------------------------------------------------------
    def _table_access(self, function: int, offset: int, size: int) -> FunctionModel:
        model = self.functions[function]
        if size not in (4, 8) or offset % size or offset + size > model.vectors * ENTRY_SIZE:
            raise _Refused(errno.EINVAL)
        return model


class _Refused(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def serve(sock: socket.socket, fault_hooks: bool = False) -> int:
    """Answer requests until the channel closes; returns the exit status."""
    worker = Worker(fault_hooks)
    recv, send, handle = sock.recv, sock.send, worker.handle
    send(RESPONSE.pack(READY_SEQ, 0, os.getpid()))
    try:
        while True:
            record = recv(64)
            if not record:
                return 0
            send(handle(record))
    except Hang:
        while True:
            signal.pause()
    except (ConnectionError, BrokenPipeError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fd", type=int, required=True, help="inherited SOCK_SEQPACKET socket")
    args = parser.parse_args(argv)
    # The server owns shutdown: a terminal's Ctrl-C must not kill the device
    # model under it mid-request; the channel closing ends us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    return serve(sock, fault_hooks=os.environ.get(FAULT_HOOKS_ENV) == "1")


if __name__ == "__main__":
    sys.exit(main())

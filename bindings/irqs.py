"""An ``IrqLines`` for a function served by libvfio-user.

On the project's engine the session owns the eventfds and the device signals
them through ``IrqLines``. Under libvfio-user the library owns them: SET_IRQS
installs, swaps and closes them inside ``vfu_run_ctx`` and tells nobody.
This sink gives the ``MsixController`` the same interface:

* ``signal``/``signal_msix`` go through ``vfu_irq_trigger`` (ERR and REQ, which
  the library cannot trigger, are written directly), and only when the vector
  has an eventfd, so "no eventfd" stays a pending reason, as on the engine;
* ``fd``/``assigned`` read the library's table (``IrqTable``);
* ``changes()`` turns what one message did to the table into the
  ``IrqRequest``s the engine would have handed the function, so swap counters,
  slow-path forwarding and redelivery on a new eventfd work unchanged.

INTx, MSI and MSI-X share one eventfd array in libvfio-user (its issue #388):
``fd(INTX, 0)`` is ``fd(MSIX, 0)``. The 82576 VF has neither INTx nor MSI, so
this never matters here; the sink reports it as the library has it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from bindings.libvfio_user import IrqTable, Library
from vmsi_server.pci.function import IrqRequest
from vmsi_server.pci.irq_lines import IrqLines
from vmsi_server.protocol.constants import IrqIndex, SetIrqsFlags

_ONE = (1).to_bytes(8, "little")
_EVENTFD_TRIGGER = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
_SHARED = (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)


class LibvfioUserIrqLines(IrqLines):
    """Eventfds held by libvfio-user, seen and signalled the way ``IrqLines`` does."""

    def __init__(self, lib: Library, ctx: int, table: IrqTable, counts: Sequence[int]) -> None:
        super().__init__(())  # the engine's own table stays empty: nothing is held here
        self._lib = lib
        self._ctx = ctx
        self._table = table
        self._counts = list(counts)
        self.swaps = 0
        """Installs that replaced an eventfd already present (QEMU's mask/unmask signal)."""
        self.trigger_errors = 0
        self._snapshot = table.raw()
        self._msix = self._fd_list(IrqIndex.MSIX)

    # -- IrqLines interface, read side --------------------------------
    def count(self, index: int) -> int:
        return self._counts[index]

    def fd(self, index: int, vector: int) -> int | None:
        if not 0 <= vector < self._counts[index]:
            raise IndexError(f"vector {vector} of IRQ index {index}")
        if index == IrqIndex.ERR:
            fd = self._table.err_efd
        elif index == IrqIndex.REQ:
            fd = self._table.req_efd
        else:
            fd = self._table.efd(vector)
        return fd if fd >= 0 else None

    def assigned(self, index: int) -> list[int]:
        return [v for v in range(self._counts[index]) if self.fd(index, v) is not None]

    # -- IrqLines interface, signalling --------------------------------
    def signal(self, index: int, vector: int) -> bool:
        """Raise ``vector``; False when it has no eventfd (nothing is written then)."""
        if index in _SHARED:
            if self._table.efd(vector) < 0:
                return False
            if self._lib.vfu_irq_trigger(self._ctx, vector) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return True  # counter saturated: an interrupt is already pending there
            self.trigger_errors += 1
            return err != errno.ENOENT
        fd = self.fd(index, vector)
        if fd is None:
            return False
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass
        return True

    def signal_msix(self, vector: int) -> bool:
        return self.signal(IrqIndex.MSIX, vector)

    # -- ownership: the library's ----------------------------------------
    def install(self, index: int, start: int, fds: Sequence[int]) -> int:
        raise NotImplementedError("libvfio-user owns the eventfds (SET_IRQS installs them)")

    def release(self, index: int, start: int, count: int) -> None:
        raise NotImplementedError("libvfio-user owns the eventfds (SET_IRQS releases them)")

    def release_index(self, index: int) -> None:
        raise NotImplementedError("libvfio-user owns the eventfds")

    def close_all(self) -> None:
        """Nothing to do: the library closes them when the client goes."""

    # -- what SET_IRQS did -----------------------------------------------
    def _fd_list(self, index: int) -> list[int | None]:
        return [self.fd(index, v) for v in range(self._counts[index])]

    def changes(self) -> list[IrqRequest]:
        """MSI-X eventfd changes since the last call, as engine-style requests.

        Called after every message libvfio-user handled. One SET_IRQS changes
        one contiguous range, so each run of installed/swapped vectors becomes
        one TRIGGER|EVENTFD request with fds, and each run of closed ones one
        without (a de-assign; the count-0 "disable all" looks the same here).
        """
        raw = self._table.raw()
        if raw == self._snapshot:
            return []
        self._snapshot = raw
        before, after = self._msix, self._fd_list(IrqIndex.MSIX)
        self._msix = after
        requests: list[IrqRequest] = []
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            start, count = run[0], len(run)
            new = after[start]
            if new is None:
                requests.append(IrqRequest(IrqIndex.MSIX, _EVENTFD_TRIGGER, start, count))
            else:
                fds = tuple(fd for fd in after[start : start + count] if fd is not None)
                replaced = sum(1 for v in run if before[v] is not None)
                self.swaps += replaced
                requests.append(
                    IrqRequest(IrqIndex.MSIX, _EVENTFD_TRIGGER, start, count, fds,
                               replaced=replaced)
                )
            run.clear()

        for vector, (old, new) in enumerate(zip(before, after, strict=True)):
            if old == new:
                flush()
                continue
            if run and (after[run[-1]] is None) != (new is None):
                flush()
            run.append(vector)
        flush()
        return requests

    def forget(self) -> None:
        """The client went and the library closed every eventfd: start from empty."""
        self._snapshot = self._table.raw()
        self._msix = self._fd_list(IrqIndex.MSIX)

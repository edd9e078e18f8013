"""The eventfds a client installed with SET_IRQS, per IRQ index and vector.

They belong to the connection that sent them (the session closes them all when
the client goes) but the device signals them, so this small table is the one
place both sides share. Replacing an fd closes the old one at once: QEMU swaps
the fd of a vector on every MSI-X unmask (and on every mask under KVM), and a
leak there grows with the interrupt rate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from vmsi_server.protocol.constants import IrqIndex

_ONE = (1).to_bytes(8, "little")


class IrqLines:
    """Trigger eventfds by (index, vector); ``None`` means not assigned."""

    def __init__(self, counts: Sequence[int]) -> None:
        self._fds: list[list[int | None]] = [[None] * count for count in counts]
        self.signal_errors = 0
        """Writes that failed on an fd that was not a working eventfd (then dropped)."""
        self.swaps = 0
        """Installs that replaced an fd already present: QEMU's mask/unmask signal."""
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, changed: Callable[[], None]) -> None:
        """``changed()`` runs after every install or release (a device that hands its
        fds to compiled code must hear of each before the loop runs again)."""
        self._listeners.append(changed)

    def remove_listener(self, changed: Callable[[], None]) -> None:
        if changed in self._listeners:
            self._listeners.remove(changed)

    def _changed(self) -> None:
        for changed in list(self._listeners):
            changed()

    def count(self, index: int) -> int:
        return len(self._fds[index])

    def fd(self, index: int, vector: int) -> int | None:
        return self._fds[index][vector]

    def assigned(self, index: int) -> list[int]:
        return [v for v, fd in enumerate(self._fds[index]) if fd is not None]

    def install(self, index: int, start: int, fds: Sequence[int]) -> int:
        """Take ownership of ``fds`` for ``start..``; returns how many replaced an fd."""
        row = self._fds[index]
        replaced = 0
        for i, new_fd in enumerate(fds):
            old = row[start + i]
            row[start + i] = new_fd
            if old is not None:
                replaced += 1
                if old != new_fd:
                    _close_quietly(old)
        self.swaps += replaced
        self._changed()
        return replaced

    def release(self, index: int, start: int, count: int) -> None:
        """De-assign exactly ``start..start+count-1`` (not from 0: libvfio-user's bug)."""
        row = self._fds[index]
        for vector in range(start, start + count):
            old = row[vector]
            row[vector] = None
            if old is not None:
                _close_quietly(old)
        self._changed()

    def release_index(self, index: int) -> None:
        self.release(index, 0, len(self._fds[index]))

    def close_all(self) -> None:
        for index in range(len(self._fds)):
            self.release_index(index)

    def signal(self, index: int, vector: int) -> bool:
        """Write the vector's eventfd; False when none is installed."""
        fd = self._fds[index][vector]
        if fd is None:
            return False
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            # The counter is saturated: the consumer has not read it yet, so an
            # interrupt is already pending there. Nothing is lost.
            pass
        except OSError:
            # Not a working eventfd after all (install() checks, but the peer
            # of a pipe-like fd can go away): drop it rather than fail forever.
            self.signal_errors += 1
            self._fds[index][vector] = None
            _close_quietly(fd)
            self._changed()
            return False
        return True

    def signal_msix(self, vector: int) -> bool:
        return self.signal(IrqIndex.MSIX, vector)


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd: anything else (a pipe, a file) could block
    or fail the loop's interrupt writes."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass

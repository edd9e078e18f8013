"""SIGTERM/SIGINT stop the event loop: the vfio-user backend convention.

Signals arrive through ``signal.set_wakeup_fd`` on a pipe the loop watches, so
the stop happens between callbacks (never inside a half-handled message) and
also wakes a wait that runs in C (the fast lane's ``epoll_wait``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence

import structlog

from vmsi_server.transport.loop import EventLoop

log = structlog.get_logger("vmsi.server")


class StopOnSignals:
    """Installed by a server's ``install_signal_handlers``; ``close()`` undoes it."""

    def __init__(self, loop: EventLoop,
                 signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._loop = loop
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w)
        for signum in signals:
            signal.signal(signum, lambda _s, _f: None)
        loop.add_reader(self._r, self._on_signal)

    def _on_signal(self) -> None:
        with contextlib.suppress(BlockingIOError):
            received = os.read(self._r, 64)
            log.info("server.signal", signals=sorted(set(received)))
        self._loop.stop()

    def close(self) -> None:
        self._loop.remove_reader(self._r)
        signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)

"""A small single-threaded reactor: fd readiness plus timers.

asyncio would do, but every vfio-user round trip pays for the loop's own
machinery, and the server's figure of merit is that round trip. This loop is
one ``epoll_wait`` per wakeup, a dict lookup per ready fd and a heap for timers.
Everything that runs on it (sessions, the NIC's tap reader, EITR timers) runs
to completion without blocking.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("vmsi.loop")

Callback = Callable[[], None]


@dataclass(order=True, slots=True)
class TimerHandle:
    """A scheduled callback; ``cancel()`` makes it a no-op without touching the heap."""

    when: float
    seq: int
    callback: Callback | None = field(compare=False)

    def cancel(self) -> None:
        self.callback = None

    @property
    def cancelled(self) -> bool:
        return self.callback is None


class EventLoop:
    """Readers keyed by fd, timers on a heap, a stop flag."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._timers: list[TimerHandle] = []
        self._soon: list[Callback] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    # -- registration -------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        if fd in self._readers:
            self._selector.modify(fd, selectors.EVENT_READ, callback)
        else:
            self._selector.register(fd, selectors.EVENT_READ, callback)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, handle)
        return handle

    def call_soon(self, callback: Callback) -> None:
        self._soon.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Schedule from another thread (tests, tools) and wake the loop's wait."""
        if self._wake_w is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake_r, self._wake_w = r, w
            self.add_reader(r, self._drain_wakeups)
        self._soon.append(callback)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already woken

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- running ------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run_once(self, max_wait: float | None = None) -> None:
        """One wakeup: wait for fds or the next timer, then run what is due."""
        timeout = max_wait
        if self._soon:
            timeout = 0.0
        elif self._timers:
            until_next = max(0.0, self._timers[0].when - time.monotonic())
            timeout = until_next if timeout is None else min(timeout, until_next)
        readers = self._readers
        for key, _events in self._selector.select(timeout):
            callback: Callback = key.data
            # A callback earlier in this batch may have removed this reader (a
            # session closing) and its fd number may already belong to someone
            # else: run only what is still registered.
            if readers.get(key.fd) is callback:
                self._run(callback)
        self._run_due_timers()
        if self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                self._run(callback)

    def _run_due_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0].when <= now:
            handle = heapq.heappop(timers)
            callback = handle.callback
            if callback is not None:
                handle.callback = None
                self._run(callback)

    @staticmethod
    def _run(callback: Callback) -> None:
        """Run one callback; a bug in one device must not stop the others."""
        try:
            callback()
        except Exception:
            log.exception("loop.callback_failed", callback=repr(callback))

    def run_forever(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        self._selector.close()
        self._readers.clear()
        self._timers.clear()
        self._soon.clear()

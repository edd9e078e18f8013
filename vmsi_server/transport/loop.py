"""A small single-threaded reactor: fd readiness plus timers.

asyncio would do, but every vfio-user round trip pays for the loop's own
machinery, and the server's figure of merit is that round trip. This loop is
one ``epoll_wait`` per wakeup, a dict lookup per ready fd and a heap for timers.
Everything that runs on it (sessions, the NIC's tap reader, EITR timers) runs
to completion without blocking.

It talks to ``select.epoll`` directly rather than through ``selectors``: the
selector's ``select()`` builds a key object list and maps every fd back to its
key in Python, which cost as much as the rest of the wakeup (see
``make bench-rtt``). vfio-user is Linux-only, so epoll is always there.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from vmsi_server.fastlane.lane import LanePoller

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
    """Readers keyed by fd, timers on a heap, a stop flag.

    ``fast_lane``: wait through the compiled lane's poller (see
    ``vmsi_server.fastlane``) so that sessions can serve messages in C; None
    (the default) uses it when it is built, False never does.
    """

    def __init__(self, fast_lane: bool | None = None) -> None:
        self._epoll = select.epoll()
        self.lanes: LanePoller | None = None
        """The lane poller sessions register with, or None (plain epoll)."""
        if fast_lane is not False:
            from vmsi_server.fastlane.lane import lane_factory

            factory = lane_factory()
            if factory is None and fast_lane:
                from vmsi_server import fastlane

                raise RuntimeError(f"fast lane unavailable: {fastlane.unavailable_reason()}")
            if factory is not None:
                self.lanes = factory(self._epoll.fileno())
        self._wait: Callable[[float, int], list[tuple[int, int]]] = (
            self._epoll.poll if self.lanes is None else self.lanes.wait
        )
        self._readers: dict[int, Callback] = {}
        self._max_events = 1
        """``maxevents`` of each ``epoll_wait``: one slot per registered fd."""
        self._removed: set[int] = set()
        """fds removed while a batch of ready fds is being dispatched (see run_once)."""
        self._timers: list[TimerHandle] = []
        self._soon: list[Callback] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    # -- registration -------------------------------------------------
    def add_reader(self, fd: int, callback: Callback) -> None:
        # Interest is always EPOLLIN, so a new callback for a known fd is only a
        # dict update (as with selectors.modify when the events are unchanged).
        if fd not in self._readers:
            self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback
        self._max_events = max(1, len(self._readers))

    def remove_reader(self, fd: int) -> None:
        if self.lanes is not None:
            self.lanes.remove(fd)
        if self._readers.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            self._removed.add(fd)
            self._max_events = max(1, len(self._readers))

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
        """One wakeup: wait for fds or the next timer, then run what is due.

        This is the top of every round trip, so it is written flat: the
        callback guard is inline (a ``try`` costs nothing on 3.11 until it
        catches), timers and soon-callbacks are looked at only when there are
        any. ``_removed`` guards against a callback earlier in a batch having
        removed a reader whose fd number was then reused: such an fd is skipped
        for this batch (epoll is level-triggered, so if the new owner's fd is
        really readable the next wakeup reports it again).
        """
        timeout = max_wait
        timers = self._timers
        if self._soon:
            timeout = 0.0
        elif timers:
            until_next = max(0.0, timers[0].when - time.monotonic())
            timeout = until_next if timeout is None else min(timeout, until_next)
        ready = self._wait(-1.0 if timeout is None else timeout, self._max_events)
        readers = self._readers
        removed = self._removed
        if removed:
            removed.clear()
        for fd, _events in ready:
            callback = readers.get(fd)
            if callback is None or (removed and fd in removed):
                continue
            try:
                callback()
            except Exception:
                log.exception("loop.callback_failed", callback=repr(callback))
        if timers:
            self._run_due_timers()
        if self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                self._run(callback)

    def _run_due_timers(self) -> None:
        timers = self._timers
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
        self._epoll.close()
        self._readers.clear()
        self._timers.clear()
        self._soon.clear()

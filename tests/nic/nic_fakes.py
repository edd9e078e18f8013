"""A fake timer loop for the NIC unit tests (the interrupt unit's EITR timers)."""

from __future__ import annotations

from collections.abc import Callable


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """call_later records; ``advance`` moves the clock and runs what is due, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], None], FakeHandle]] = []

    def call_later(self, delay: float, callback: Callable[[], None], /) -> FakeHandle:
        handle = FakeHandle()
        self.timers.append((self.now + delay, callback, handle))
        return handle

    def pending(self) -> int:
        return sum(1 for _, _, h in self.timers if not h.cancelled)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if t[0] <= end]
            if not due:
                break
            first = min(due, key=lambda t: t[0])
            self.timers.remove(first)
            self.now = max(self.now, first[0])
            if not first[2].cancelled:
                first[1]()
        self.now = end

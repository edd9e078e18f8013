"""Counts kept elsewhere, folded in before every read-out.

The compiled fast lane counts in C what it serves; a collector moves those
counts into the Python counters (as deltas) whenever someone reads them, so
every reader sees one set of figures whichever path served a message.
"""

from __future__ import annotations

from collections.abc import Callable


class Collectors:
    """A mixin: ``add_collector``/``remove_collector``, and ``collect()`` for read-outs."""

    __slots__ = ()
    _collectors: list[Callable[[], None]]

    def add_collector(self, collect: Callable[[], None]) -> None:
        """``collect()`` will run before every read-out of these counters."""
        self._collectors.append(collect)

    def remove_collector(self, collect: Callable[[], None]) -> None:
        if collect in self._collectors:
            self._collectors.remove(collect)

    def collect(self) -> None:
        for collect in list(self._collectors):
            collect()

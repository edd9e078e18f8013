"""Fixtures for the protocol tests: real eventfds that are cleaned up afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


@pytest.fixture
def eventfds() -> Iterator[Callable[[int], list[int]]]:
    """Make real eventfds; whatever the test leaves open is closed afterwards (only if the
    number still names an eventfd, so a reused number is never closed by mistake)."""
    made: list[int] = []

    def make(n: int = 1) -> list[int]:
        fds = [os.eventfd(0) for _ in range(n)]
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        if _is_eventfd(fd):
            os.close(fd)

"""Progress lines for long steps.

A cold build takes minutes; a line with a timestamp when each step starts and how
long it took tells the person (and CI log) where the time went.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("vmsilab")


def setup_logging(verbose: bool = False) -> None:
    """Timestamped lines on stderr; idempotent so tests and the CLI can both call it."""
    root = logging.getLogger("vmsilab")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s vmsilab: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.propagate = False
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log the start and the duration of a step (also when it fails)."""
    t0 = time.monotonic()
    log.info("%s ...", name)
    try:
        yield
    except BaseException:
        log.info("%s FAILED after %.1f s", name, time.monotonic() - t0)
        raise
    log.info("%s done in %.1f s", name, time.monotonic() - t0)

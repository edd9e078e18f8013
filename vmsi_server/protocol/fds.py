"""Closing received file descriptors.

Every fd that arrives with SCM_RIGHTS is owned by this process from the moment
``recvmsg`` returns. The protocol core closes the fds of any message it rejects, so a
hostile or buggy peer cannot make the server leak descriptors (conformance case 7).
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already closed: closing is cleanup and must not fail."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

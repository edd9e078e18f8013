"""The compiled fast lane: whole vfio-user round trips without the interpreter.

Most of a Python server's cost per message is the interpreter waking up after
a context switch, not any one function (see ``make bench-rtt``). The lane is a
small C module (``lane.c``, built with cffi by ``make setup``) that runs the
reactor's ``epoll_wait`` itself, reads each session's socket, answers
synchronous REGION_READs that fall in a device's read windows (config space,
the MSI-X shadow table, the PBA: memory the device keeps current) and hands
posted REGION_WRITEs to the session as plain values. Everything else, and
everything after it on that connection, goes to the Python path as before.

The lane is optional: when the module is not built the server runs the pure
Python path (``available()`` says why not), and ``--no-fast-lane`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_module: Any = None
_reason: str | None = None

try:
    from vmsi_server.fastlane import _lane as _module  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # not built (make setup builds it)
    _reason = f"not built ({exc}); run: python -m vmsi_server.fastlane.build"


def available() -> bool:
    return _module is not None


def unavailable_reason() -> str | None:
    """None when the lane can be used, else why not."""
    return _reason


def module() -> Any:
    """The cffi module (``ffi``, ``lib``); only call when :func:`available`."""
    if _module is None:
        raise RuntimeError(f"fast lane unavailable: {_reason}")
    return _module


RxChecksum = Callable[[Any, int, int], int]
"""``(frame buffer, length, vnet header flags) -> status/error bits`` (rxcsum.c)."""


def rx_checksum() -> RxChecksum | None:
    """The receive checksum check of the 82576 in C, or None when the lane is not
    built (the VF then reports no checksum bits: the guest checks in software)."""
    if _module is None:
        return None
    from_buffer, check = _module.ffi.from_buffer, _module.lib.vl_rx_checksum

    def status(frame: Any, length: int, vnet_flags: int) -> int:
        return int(check(from_buffer("uint8_t[]", frame), length, vnet_flags))

    return status

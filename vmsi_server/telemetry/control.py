"""A control socket that answers counter queries while the server runs.

One request per connection: the client sends a command line (``counters``),
the server answers one JSON document and closes. It runs on the server's own
loop, so a snapshot is consistent with the messages served so far; the
socket is accept-and-answer only, so a slow reader cannot stall the loop for
long (replies are small and sent blocking with a short timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import structlog

from vmsi_server.transport.loop import EventLoop, TimerHandle

log = structlog.get_logger("vmsi.control")

COMMANDS = ("counters", "ping")
_CLIENT_TIMEOUT = 0.5


class ControlServer:
    def __init__(self, path: str, loop: EventLoop, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._loop = loop
        self._snapshot = snapshot
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        # Never wait on a control client on the loop: answer when its command
        # is there, drop it if it stays silent.
        conn.setblocking(False)
        fd = conn.fileno()
        deadline = self._loop.call_later(_CLIENT_TIMEOUT, lambda: self._drop(fd, conn))
        self._loop.add_reader(fd, lambda: self._serve(fd, conn, deadline))

    def _serve(self, fd: int, conn: socket.socket, deadline: TimerHandle) -> None:
        deadline.cancel()
        self._loop.remove_reader(fd)
        with conn:
            try:
                command = conn.recv(256).decode("ascii", "replace").strip()
                conn.settimeout(_CLIENT_TIMEOUT)  # the answer is small; a stuck reader is cut off
                conn.sendall(self._answer(command).encode() + b"\n")
            except OSError as exc:
                log.warning("control.client_failed", error=str(exc))

    def _drop(self, fd: int, conn: socket.socket) -> None:
        self._loop.remove_reader(fd)
        conn.close()

    def _answer(self, command: str) -> str:
        if command == "ping":
            return json.dumps({"ok": True})
        if command == "counters":
            return json.dumps(self._snapshot(), sort_keys=True)
        return json.dumps({"error": f"unknown command {command!r}; try one of {COMMANDS}"})

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def query(path: str, command: str = "counters", timeout: float = 5.0) -> dict[str, Any]:
    """Client side: ask a running server."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result

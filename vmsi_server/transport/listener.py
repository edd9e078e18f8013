"""The listening UNIX socket of one device.

The socket file is created mode 0600 (the device hands out guest memory
access to whoever connects) and a stale file left by a crashed server is
replaced, but a live one is not: if something answers on the path, another
server owns it and starting a second one is an error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct

_SEND_TIMEOUT = struct.pack("ll", 2, 0)
"""Two seconds: far above any healthy reply, far below QEMU's 5 s message timeout."""


class AcceptFailed(Exception):
    """accept() failed for lack of resources; retry later, do not spin."""


class SocketInUse(Exception):
    """Another live server listens on the path."""


class Listener:
    """Bind, listen, accept; remove the socket file on close."""

    def __init__(self, path: str | None = None, fd: int | None = None) -> None:
        if (path is None) == (fd is None):
            raise ValueError("give exactly one of a socket path or an fd")
        self.path = path
        self._owns_path = False
        if fd is not None:
            self.sock = socket.socket(fileno=fd)
            if self.sock.family != socket.AF_UNIX or self.sock.type != socket.SOCK_STREAM:
                raise ValueError(f"fd {fd} is not a UNIX stream socket")
        else:
            assert path is not None
            self.sock = _bind(path)
            self._owns_path = True
        self.sock.listen(4)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            # Out of fds (EMFILE/ENFILE) or memory: the connection stays queued
            # and the listener stays readable; the caller backs off.
            raise AcceptFailed(str(exc)) from exc
        conn.setblocking(True)
        # Replies are sent blocking, on the loop. A client that stops reading
        # must not freeze every device of the process: after this long a send
        # fails and that client's session is closed.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _SEND_TIMEOUT)
        return conn

    def close(self) -> None:
        self.sock.close()
        if self._owns_path and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._owns_path = False


def _bind(path: str) -> socket.socket:
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUse(f"a server is already listening on {path}")

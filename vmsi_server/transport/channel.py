"""Bytes and file descriptors over a connected UNIX stream socket.

One ``recvmsg`` per wakeup into a reusable buffer: a burst of posted writes
(TDT doorbells) arrives as many messages in one read, and the protocol layer
splits them. The kernel ends a read right after the message that carried
SCM_RIGHTS fds, so the fds of a read always belong to the last message that
starts in it; the protocol layer relies on that.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence

MAX_FDS_PER_READ = 1024
"""Room for ancillary fds per read; more than any client may send in one message."""

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)


class ChannelClosed(Exception):
    """The peer closed the connection (or it broke)."""


class Channel:
    """A connected socket with fd passing; knows nothing about messages."""

    def __init__(self, sock: socket.socket, read_size: int = 1 << 20) -> None:
        self.sock = sock
        self._buffer = bytearray(read_size)
        self._view = memoryview(self._buffer)
        self.bytes_in = 0
        self.bytes_out = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> tuple[memoryview, list[int]]:
        """Read what is there: (data, fds). Raises ChannelClosed on EOF.

        The returned view is valid until the next call; the protocol layer
        copies what it keeps.
        """
        try:
            nbytes, ancdata, msg_flags, _addr = self.sock.recvmsg_into(
                [self._buffer], _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return self._view[:0], []
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ChannelClosed(str(exc)) from exc
        fds = _fds_from(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            # More fds than we had room for: the kernel dropped some. Close
            # what did arrive; the message will fail its fd-count check.
            for fd in fds:
                os.close(fd)
            fds = []
        if nbytes == 0:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("peer closed the connection")
        self.bytes_in += nbytes
        return self._view[:nbytes], fds

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one whole message (blocking until written), fds attached to its first byte."""
        view = memoryview(data)
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([view], ancillary)
            else:
                sent = self.sock.send(view)
            while sent < len(view):
                view = view[sent:]
                sent = self.sock.send(view)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ChannelClosed(str(exc)) from exc
        self.bytes_out += len(data)

    def close(self) -> None:
        self.sock.close()


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(payload) - (len(payload) % arr.itemsize)
            arr.frombytes(payload[:usable])
            fds.extend(arr)
    return fds

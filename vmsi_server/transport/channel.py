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
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # plain ints: IntFlag arithmetic runs Python code


class ChannelClosed(Exception):
    """The peer closed the connection (or it broke)."""


class Channel:
    """A connected socket with fd passing; knows nothing about messages."""

    def __init__(self, sock: socket.socket, read_size: int = 1 << 20) -> None:
        self.sock = sock
        self._buffer = bytearray(read_size)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]
        # Bound once: each is looked up on every message otherwise.
        self._recvmsg_into = sock.recvmsg_into
        self._send = sock.send
        self.bytes_in = 0
        self.bytes_out = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> tuple[bytes, tuple[int, ...]]:
        """Read what is there: (data, fds). Raises ChannelClosed on EOF.

        ``data`` is a copy of what was read (``b""`` when nothing was there),
        so the protocol layer may keep views into it: it would have to copy
        anything it keeps from a view into our reusable buffer anyway, and a
        ``bytes`` lets it take its single-message fast path. Reading goes into
        the 1 MiB buffer so that a burst of posted writes comes in one call.
        The common case (some bytes, no ancillary data) is three attribute
        loads and a copy; fds, truncation and EOF go to :meth:`_unusual`.
        """
        try:
            nbytes, ancdata, msg_flags, _addr = self._recvmsg_into(
                self._buffers, _CMSG_SPACE, _MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return b"", ()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ChannelClosed(str(exc)) from exc
        if ancdata or msg_flags & _MSG_CTRUNC or not nbytes:
            return self._unusual(nbytes, ancdata, msg_flags)
        self.bytes_in += nbytes
        return self._view[:nbytes].tobytes(), ()

    def _unusual(
        self, nbytes: int, ancdata: list[tuple[int, int, bytes]], msg_flags: int
    ) -> tuple[bytes, tuple[int, ...]]:
        fds = _fds_from(ancdata)
        if msg_flags & _MSG_CTRUNC:
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
        return self._view[:nbytes].tobytes(), tuple(fds)

    def send(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Send one whole message (blocking until written), fds attached to its first byte.

        Without fds this is one ``send`` (``sendto`` in strace); the loop for a
        short write only runs when the socket buffer was full.
        """
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], ancillary)
            else:
                sent = self._send(data)
            size = len(data)
            if sent != size:
                view = memoryview(data).cast("B")
                size = len(view)
                while sent < size:
                    sent += self._send(view[sent:])
        except OSError as exc:
            # Reset, broken pipe, or the send timeout of a client that stopped
            # reading (EAGAIN): either way this client is gone.
            raise ChannelClosed(f"send failed: {exc}") from exc
        self.bytes_out += size

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

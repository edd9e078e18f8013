"""Error types of the protocol core.

Two kinds, as in h11: :class:`ProtocolError` is the *peer's* fault (a message that
breaks the wire rules) and always carries the positive errno that goes into the error
reply; :class:`LocalProtocolError` is *our* fault (the session asked the connection for
something the protocol does not allow) and is a programming error, never sent anywhere.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A received message is invalid; answer it with ``errno`` (EINVAL, E2BIG, ...).

    Decoders raise it; the connection turns it into a ``BadRequest`` event and closes
    the message's fds, so the session never sees a half-valid message.
    """

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        return f"[errno {self.errno}] {self.reason}"


class LocalProtocolError(RuntimeError):
    """The caller used the connection in a way the protocol forbids (a bug on our side):
    replying with the wrong command, sending a request in the wrong state, too many fds."""

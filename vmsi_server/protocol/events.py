"""Events a connection hands to its user (session, client library), h11-style.

Ownership of fds: once an event is returned by ``next_event``, the fds inside it (in
``Request.message`` or ``ReplyReceived.fds``) belong to the caller. Fds of rejected
messages are closed by the connection *before* the event is produced, so a
``BadRequest`` or ``UnexpectedReply`` never carries an fd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from ._frozen import fast_init
from .capabilities import Capabilities, NegotiatedParameters
from .header import Header
from .messages import BytesLike, Fds, Message, VersionReply, VersionRequest


@fast_init
@dataclass(frozen=True, slots=True)
class Request:
    """A valid request for the session to execute and answer with ``conn.reply`` (or
    ``conn.error_reply``; both return nothing when ``header.no_reply``)."""

    header: Header
    message: Message


@fast_init
@dataclass(frozen=True, slots=True)
class VersionNegotiated:
    """The server accepted the client's VERSION; send ``conn.reply(header, reply)``.
    The connection is already READY."""

    header: Header
    request: VersionRequest
    client: Capabilities
    params: NegotiatedParameters
    reply: VersionReply


@fast_init
@dataclass(frozen=True, slots=True)
class BadRequest:
    """A message that must be refused with ``errno``: send ``conn.error_reply(header,
    errno)`` (empty for NO_REPLY). ``fatal``: the stream cannot continue (broken framing,
    failed VERSION); send the error if you like, then close the transport. Its fds are
    already closed."""

    header: Header
    errno: int
    reason: str
    fatal: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A reply matching one of our outstanding requests.

    ``errno`` is 0 on success; the peer's errno for an error reply; or the errno of our
    own validation when the body does not decode or does not match ``request``; then
    ``message`` is None. ``fds`` are the caller's (closed already when errno != 0).
    """

    header: Header
    body: BytesLike
    fds: Fds
    request: Message
    message: Message | None
    errno: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class UnexpectedReply:
    """A reply that answers nothing we sent (unknown id or wrong command). It was dropped,
    its fds closed; never answer it. Log it."""

    header: Header
    reason: str


@fast_init
@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream (``receive_data(b"")``). ``clean`` is False when it
    stopped inside a message. ``unanswered`` are our requests that will get no reply."""

    clean: bool
    reason: str
    unanswered: tuple[Message, ...] = ()


Event: TypeAlias = (
    Request | VersionNegotiated | BadRequest | ReplyReceived | UnexpectedReply | ConnectionClosed
)

"""The 16-byte header that starts every vfio-user message.

====== ==== ========= ==================================================
offset size field     meaning
====== ==== ========= ==================================================
0      2    msg_id    chosen by the sender, echoed by the reply
2      2    command   1..18 (see :class:`~.constants.Command`)
4      4    size      whole message, header included
8      4    flags     bits 0-3 type (0 request, 1 reply), 0x10 NO_REPLY,
                      0x20 ERROR
12     4    error     positive errno in error replies, 0 otherwise
====== ==== ========= ==================================================

``command`` stays a plain ``int`` so that unknown command numbers survive decoding
(they must be answered, not crash the parser).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._frozen import fast_init
from .constants import (
    EINVAL,
    ERROR_FLAG,
    HEADER_SIZE,
    HEADER_STRUCT,
    MESSAGE_TYPE_MASK,
    NO_REPLY,
    MessageType,
)
from .errors import ProtocolError


@fast_init
@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header; ``size`` is not validated here because framing rules depend on
    the connection's state (see ``ServerConnection``)."""

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        if len(data) - offset < HEADER_SIZE:
            raise ProtocolError(EINVAL, f"header needs {HEADER_SIZE} bytes")
        return cls(*HEADER_STRUCT.unpack_from(data, offset))

    @property
    def message_type(self) -> int:
        return self.flags & MESSAGE_TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.flags & MESSAGE_TYPE_MASK == MessageType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR_FLAG)

    @property
    def body_size(self) -> int:
        return self.size - HEADER_SIZE

from __future__ import annotations

import pytest

from vmsi_server.protocol import Header, ProtocolError
from vmsi_server.protocol.constants import EINVAL, HEADER_SIZE


def test_pack_unpack_round_trip() -> None:
    header = Header(0xBEEF, 9, 32, 0x10, 0)
    raw = header.pack()
    assert len(raw) == HEADER_SIZE
    assert raw == bytes.fromhex("efbe0900200000001000000000000000")
    assert Header.unpack(raw) == header
    assert Header.unpack(b"xx" + raw, 2) == header


@pytest.mark.parametrize(
    ("flags", "is_reply", "no_reply", "is_error"),
    [(0x0, False, False, False), (0x1, True, False, False), (0x10, False, True, False),
     (0x21, True, False, True), (0x31, True, True, True)],
)
def test_flag_properties(flags: int, is_reply: bool, no_reply: bool, is_error: bool) -> None:
    header = Header(1, 1, 16, flags)
    assert (header.is_reply, header.no_reply, header.is_error) == (is_reply, no_reply, is_error)
    assert header.message_type == flags & 0xF


def test_unpack_short_is_einval() -> None:
    with pytest.raises(ProtocolError) as info:
        Header.unpack(bytes(15))
    assert info.value.errno == EINVAL


def test_header_is_frozen_and_slotted() -> None:
    header = Header(1, 2, 16)
    with pytest.raises(AttributeError):
        header.msg_id = 3  # type: ignore[misc]
    assert not hasattr(header, "__dict__")
    assert header.body_size == 0

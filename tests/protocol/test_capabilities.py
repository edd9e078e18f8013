"""Capability JSON parsing, negotiation and the client-side check of the reply."""

from __future__ import annotations

import json

import pytest

from vmsi_server.protocol import (
    QEMU_CAPABILITIES,
    QEMU_CAPABILITIES_JSON,
    Capabilities,
    MigrationCapability,
    ProtocolError,
    ServerLimits,
    accept_server_reply,
    negotiate,
    parse_capabilities,
)
from vmsi_server.protocol.constants import EINVAL, HEADER_SIZE


def test_parse_qemu_proposal() -> None:
    caps = parse_capabilities(QEMU_CAPABILITIES_JSON)
    assert caps == QEMU_CAPABILITIES
    assert caps.max_msg_fds == 16 and caps.max_data_xfer_size == 1 << 20
    assert caps.pgsizes == 4096 and caps.max_dma_maps == 65535
    assert caps.write_multiple
    assert caps.migration == MigrationCapability(4096, 256 << 20)


def test_key_order_does_not_matter() -> None:
    doc = json.loads(QEMU_CAPABILITIES_JSON)
    reordered = {"capabilities": dict(reversed(list(doc["capabilities"].items())))}
    assert parse_capabilities(json.dumps(reordered, indent=2)) == QEMU_CAPABILITIES


@pytest.mark.parametrize("text", ["", "{}", '{"other":1}', '{"capabilities":{}}'])
def test_defaults(text: str) -> None:
    caps = parse_capabilities(text)
    assert (caps.max_msg_fds, caps.max_data_xfer_size, caps.pgsizes, caps.max_dma_maps,
            caps.write_multiple, caps.migration) == (1, 1 << 20, 4096, 65535, False, None)


def test_unknown_keys_are_ignored_and_twin_socket_parsed() -> None:
    caps = parse_capabilities(
        '{"capabilities":{"future":[1,2],"twin_socket":{"supported":true,"fd_index":0}}}'
    )
    assert caps.twin_socket and "future" in caps.proposed


@pytest.mark.parametrize("value", [0, 1, 1024])
def test_max_msg_fds_range_accepted(value: int) -> None:
    assert parse_capabilities(f'{{"capabilities":{{"max_msg_fds":{value}}}}}').max_msg_fds == value


@pytest.mark.parametrize(
    "text",
    ['{"capabilities":{"max_msg_fds":-1}}', '{"capabilities":{"max_msg_fds":1025}}',
     '{"capabilities":{"twin_socket":true}}', '{"capabilities":{"twin_socket":{"supported":1}}}',
     '{"capabilities":{"max_dma_maps":0}}', '{"capabilities":{"pgsizes":0}}',
     '{"capabilities":{"max_data_xfer_size":18446744073709551616}}',
     '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":"big"}}}',
     '{"capabilities":{"max_msg_fds":Infinity}}'],
)
def test_malformed(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_capabilities(text)
    assert info.value.errno == EINVAL


def test_to_json_round_trips() -> None:
    assert parse_capabilities(QEMU_CAPABILITIES.to_json()) == QEMU_CAPABILITIES


def _reply_caps(text: str) -> dict[str, object]:
    caps = json.loads(text)["capabilities"]
    assert isinstance(caps, dict)
    return caps


def test_negotiate_with_qemu() -> None:
    params = negotiate(QEMU_CAPABILITIES, ServerLimits())
    assert params.max_msg_fds == 8 and params.client_max_msg_fds == 16
    assert params.max_data_xfer_size == 1 << 20 and params.write_multiple
    assert _reply_caps(params.reply_capabilities) == {
        "max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "write_multiple": True}
    assert params.max_message_size == HEADER_SIZE + 16 + (1 << 20)


def test_negotiate_write_multiple_needs_both_sides() -> None:
    assert not negotiate(QEMU_CAPABILITIES, ServerLimits(write_multiple=False)).write_multiple
    assert not negotiate(Capabilities(), ServerLimits()).write_multiple
    text = negotiate(Capabilities(), ServerLimits()).reply_capabilities
    assert "write_multiple" not in _reply_caps(text)


def test_negotiate_takes_the_smaller_limits() -> None:
    client = Capabilities(max_data_xfer_size=8192, max_dma_maps=10, pgsizes=4096 | 8192,
                          proposed=frozenset({"max_data_xfer_size", "max_dma_maps", "pgsizes"}))
    params = negotiate(client, ServerLimits(pgsizes=8192 | 2 << 20))
    assert params.max_data_xfer_size == 8192 and params.max_dma_maps == 10
    assert params.pgsizes == 8192
    caps = _reply_caps(params.reply_capabilities)
    assert caps["max_dma_maps"] == 10 and caps["pgsizes"] == 8192


def test_negotiate_no_common_page_size() -> None:
    with pytest.raises(ProtocolError):
        negotiate(Capabilities(pgsizes=2 << 20), ServerLimits())


def test_negotiate_major() -> None:
    with pytest.raises(ProtocolError):
        negotiate(QEMU_CAPABILITIES, ServerLimits(), client_major=1)


def test_reply_fits_a_small_request() -> None:
    """QEMU's reply buffer is its request; optional keys go first, max_msg_fds stays."""
    full = negotiate(QEMU_CAPABILITIES, ServerLimits()).reply_capabilities
    size = HEADER_SIZE + 4 + len(full)  # one byte short for the NUL
    params = negotiate(QEMU_CAPABILITIES, ServerLimits(), request_size=size)
    assert HEADER_SIZE + 4 + len(params.reply_capabilities) + 1 <= size
    assert not params.write_multiple
    assert "write_multiple" not in params.reply_capabilities
    tiny = negotiate(QEMU_CAPABILITIES, ServerLimits(), request_size=HEADER_SIZE + 4)
    assert _reply_caps(tiny.reply_capabilities) == {"max_msg_fds": 8}


@pytest.mark.parametrize(
    "kwargs",
    [{"max_msg_fds": 0}, {"max_msg_fds": 17}, {"max_data_xfer_size": 4095},
     {"max_data_xfer_size": (64 << 20) + 1}, {"pgsizes": 100}, {"max_dma_maps": 0},
     {"minor": 70000}],
)
def test_server_limits_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ServerLimits(**kwargs)  # type: ignore[arg-type]


def test_accept_server_reply() -> None:
    text = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":65536,"write_multiple":true}}'
    params = accept_server_reply(QEMU_CAPABILITIES, server_major=0, server_minor=0,
                                 server_text=text)
    assert params.max_msg_fds == 8 and params.client_max_msg_fds == 16
    assert params.max_data_xfer_size == 65536 and params.write_multiple


@pytest.mark.parametrize(
    ("major", "minor", "text"),
    [(1, 0, ""), (0, 1, ""),
     (0, 0, '{"capabilities":{"twin_socket":{"supported":true}}}'),
     (0, 0, '{"capabilities":{"write_multiple":true}}')],
)
def test_accept_server_reply_rejects(major: int, minor: int, text: str) -> None:
    proposed = Capabilities(max_msg_fds=4, proposed=frozenset({"max_msg_fds"}))
    with pytest.raises(ProtocolError):
        accept_server_reply(proposed, server_major=major, server_minor=minor, server_text=text)


def test_accept_server_reply_defaults_to_spec() -> None:
    params = accept_server_reply(QEMU_CAPABILITIES, server_major=0, server_minor=0,
                                 server_text="")
    assert params.max_msg_fds == 1 and not params.write_multiple

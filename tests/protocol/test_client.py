"""ClientConnection: the project's own client end (tests, benchmarks, replay tool)."""

from __future__ import annotations

import pytest

from vmsi_server.protocol import (
    Capabilities,
    ClientConnection,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DmaMapRequest,
    LocalProtocolError,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    ReplyReceived,
    Request,
    RunState,
    UnexpectedReply,
    VersionReply,
    encode_frame,
    frame,
)
from vmsi_server.protocol.constants import EINVAL, ENOENT, Command

from .helpers import connected_pair, one


def test_version_handshake() -> None:
    server, client = connected_pair()
    assert client.state is RunState.READY and server.state is RunState.READY
    assert client.negotiated is not None and server.negotiated is not None
    assert client.negotiated.max_msg_fds == server.negotiated.max_msg_fds == 8
    assert client.negotiated.write_multiple and server.negotiated.write_multiple
    assert client.negotiated.max_data_xfer_size == server.negotiated.max_data_xfer_size


def test_request_order_rules() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.request(DeviceGetInfoRequest())
    client.request(client.version_request())
    client.request(DeviceGetInfoRequest())  # pipelining behind VERSION is allowed
    with pytest.raises(LocalProtocolError):
        client.request(client.version_request())
    with pytest.raises(LocalProtocolError):
        client.request(DeviceGetInfoReply(16, 0, 0, 0))


def test_ids_increase_and_replies_match() -> None:
    server, client = connected_pair()
    ids = []
    for offset in (0, 4, 8):
        data, _, msg_id = client.request(RegionReadRequest(offset, 7, 4))
        ids.append(msg_id)
        event = one(server, data)
        assert isinstance(event, Request)
        reply, _ = server.reply(event.header, RegionReadReply(offset, 7, 4, b"abcd"))
        received = one(client, reply)
        assert isinstance(received, ReplyReceived) and received.errno == 0
        assert received.message == RegionReadReply(offset, 7, 4, b"abcd")
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]


def test_error_reply_maps_to_errno() -> None:
    server, client = connected_pair()
    data, _, _ = client.request(DeviceGetInfoRequest())
    event = one(server, data)
    assert isinstance(event, Request)
    received = one(client, server.error_reply(event.header, ENOENT))
    assert isinstance(received, ReplyReceived)
    assert received.errno == ENOENT and received.message is None


def test_posted_requests_are_not_tracked() -> None:
    _, client = connected_pair()
    data, _, msg_id = client.request(RegionWriteRequest(0, 0, 1, b"x"), no_reply=True)
    assert data[8] == 0x10 and msg_id not in client.outstanding
    assert isinstance(one(client, frame(msg_id, Command.REGION_WRITE, bytes(16), flags=1)),
                      UnexpectedReply)


def test_fd_limit_follows_the_server() -> None:
    _, client = connected_pair()
    _, fds, _ = client.request(DmaMapRequest(32, 3, 0, 0, 4096, fd=5))
    assert fds == [5]


@pytest.mark.parametrize(
    "reply",
    [VersionReply(1, 0, ""), VersionReply(0, 1, ""),
     VersionReply(0, 0, '{"capabilities":{"write_multiple":true}}'),
     VersionReply(0, 0, "{broken")],
)
def test_bad_version_reply_closes(reply: VersionReply) -> None:
    client = ClientConnection(Capabilities(max_msg_fds=4, proposed=frozenset({"max_msg_fds"})))
    _, _, msg_id = client.request(client.version_request())
    received = one(client, encode_frame(msg_id, reply))
    assert isinstance(received, ReplyReceived) and received.errno == EINVAL
    assert client.state is RunState.CLOSED
    with pytest.raises(LocalProtocolError):
        client.request(DeviceGetInfoRequest())


def test_version_error_reply_closes() -> None:
    client = ClientConnection()
    _, _, msg_id = client.request(client.version_request())
    received = one(client, frame(msg_id, Command.VERSION, flags=0x21, error=EINVAL))
    assert isinstance(received, ReplyReceived) and received.errno == EINVAL
    assert client.state is RunState.CLOSED

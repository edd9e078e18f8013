"""Every request kind against the real server: good answers, error replies, no leaks."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest

from vmsi_server.client.client import ServerError, VfioUserClient, read_eventfd
from vmsi_server.protocol import messages as m
from vmsi_server.protocol.constants import (
    HEADER_STRUCT,
    IrqIndex,
    IrqInfoFlags,
    RegionIndex,
    SetIrqsFlags,
)
from vmsi_server.transport.channel import ChannelClosed

from .conftest import RunningServer

EVENTFD_TRIGGER = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
NONE_TRIGGER = SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER


def _errno_of(call: object) -> int:
    with pytest.raises(ServerError) as info:
        call()  # type: ignore[operator]
    return info.value.errno


# -- device description ---------------------------------------------------
def test_device_info(client: VfioUserClient) -> None:
    info = client.device_info()
    assert (info.flags, info.num_regions, info.num_irqs) == (0x3, 9, 5)


def test_region_info_layout(client: VfioUserClient) -> None:
    sizes = {i: client.region_info(i).size for i in range(9)}
    assert sizes == {0: 16384, 1: 0, 2: 0, 3: 16384, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
    for absent in (1, 2, 4, 5, 6, 8):
        assert client.region_info(absent).flags == 0
    # No region offers mmap: that keeps QEMU's BAR writes posted.
    assert all(not client.region_info(i).flags & 0x4 for i in range(9))


def test_region_info_bad_index(client: VfioUserClient) -> None:
    assert _errno_of(lambda: client.region_info(9)) == errno.EINVAL
    assert client.region_info(0).size == 16384  # still in step


def test_irq_info(client: VfioUserClient) -> None:
    counts = {i: client.irq_info(i).count for i in range(5)}
    assert counts == {0: 0, 1: 0, 2: 3, 3: 1, 4: 1}
    msix = client.irq_info(IrqIndex.MSIX)
    assert msix.flags & IrqInfoFlags.EVENTFD
    assert msix.flags & IrqInfoFlags.MASKABLE
    assert not msix.flags & IrqInfoFlags.NORESIZE
    assert _errno_of(lambda: client.irq_info(5)) == errno.EINVAL


# -- region access ----------------------------------------------------------
def test_config_identity(client: VfioUserClient) -> None:
    cfg = client.region_read(RegionIndex.CONFIG, 0, 256)
    assert cfg[0:4] == bytes.fromhex("8680ca10")
    assert cfg[0x0B] == 0x02  # class: network
    assert cfg[0x3D] == 0  # no INTx pin on a VF


@pytest.mark.parametrize(
    ("region", "offset", "count"),
    [(RegionIndex.CONFIG, 4095, 2), (RegionIndex.BAR0, 16384, 4), (1, 0, 4), (9, 0, 4),
     (RegionIndex.BAR0, 2**64 - 2, 4)],
)
def test_region_read_out_of_bounds(
    client: VfioUserClient, region: int, offset: int, count: int
) -> None:
    assert _errno_of(lambda: client.region_read(region, offset, count)) == errno.EINVAL
    assert client.read32(RegionIndex.CONFIG, 0) == 0x10CA8086


def test_zero_count_access(client: VfioUserClient) -> None:
    assert client.region_read(RegionIndex.BAR0, 0, 0) == b""
    client.region_write(RegionIndex.BAR0, 0, b"")


def test_read_only_config_bits_stay(client: VfioUserClient) -> None:
    client.region_write(RegionIndex.CONFIG, 0, b"\xff\xff\xff\xff")
    assert client.read32(RegionIndex.CONFIG, 0) == 0x10CA8086


def test_bar_sizing_through_protocol(client: VfioUserClient) -> None:
    client.write32(RegionIndex.CONFIG, 0x10, 0xFFFFFFFF)
    client.write32(RegionIndex.CONFIG, 0x14, 0xFFFFFFFF)
    low = client.read32(RegionIndex.CONFIG, 0x10)
    high = client.read32(RegionIndex.CONFIG, 0x14)
    assert low & ~0xF == (~(16384 - 1)) & 0xFFFFFFF0
    assert low & 0x6 == 0x4  # 64-bit
    assert high == 0xFFFFFFFF


def test_posted_write_errors_get_no_reply(client: VfioUserClient) -> None:
    # A bad posted write must not be answered: the next reply must be for the next id.
    client.region_write(RegionIndex.BAR0, 1 << 20, b"\0\0\0\0", posted=True)
    assert client.read32(RegionIndex.CONFIG, 0) == 0x10CA8086


def test_write_multi(client: VfioUserClient) -> None:
    entries = tuple(
        m.WriteMultiEntry(0x3C, RegionIndex.CONFIG, 1, bytes([v])) for v in (1, 2, 9)
    )
    client.send(m.RegionWriteMultiRequest(entries), posted=True)
    assert client.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x09"


# -- DMA ---------------------------------------------------------------------
def test_dma_map_unmap(client: VfioUserClient) -> None:
    client.map_ram(0x100000, 1 << 20)
    fd = os.memfd_create("x")
    os.ftruncate(fd, 4096)
    try:
        err = _errno_of(lambda: client.dma_map(0x100000 + 4096, 4096, fd))
        assert err == errno.EEXIST
    finally:
        os.close(fd)
    assert _errno_of(lambda: client.dma_unmap(0x100000, 4096)) == errno.ENOENT
    client.dma_unmap(0x100000, 1 << 20)
    assert _errno_of(lambda: client.dma_unmap(0x100000, 1 << 20)) == errno.ENOENT


def test_dma_map_without_fd_is_accepted(client: VfioUserClient) -> None:
    client.dma_map(0xFFFC0000, 0x40000, None)  # what QEMU sends for the BIOS ROM
    client.dma_unmap(0, 0, unmap_all=True)


def test_dma_map_bad_fd_is_refused_and_closed(server: RunningServer,
                                              client: VfioUserClient) -> None:
    r, w = os.pipe()
    before = server.open_fds()
    try:
        assert _errno_of(lambda: client.dma_map(0x200000, 4096, r)) in (errno.EINVAL,
                                                                        errno.EFAULT)
    finally:
        os.close(r)
        os.close(w)
    assert server.open_fds() == before


def test_unmap_all(client: VfioUserClient) -> None:
    client.map_ram(0x100000, 1 << 16)
    client.map_ram(0x200000, 1 << 16)
    client.dma_unmap(0, 0, unmap_all=True)
    client.map_ram(0x100000, 1 << 16)  # free again


# -- interrupts --------------------------------------------------------------
def test_set_irqs_trigger_fires_installed_eventfds(client: VfioUserClient) -> None:
    fds = client.install_msix_eventfds(3)
    client.region_write(RegionIndex.CONFIG, 0x72, b"\x00\x80")  # MSI-X enable
    for v in range(3):
        client.region_write(RegionIndex.BAR3, v * 16 + 12, b"\0\0\0\0")  # unmask
    client.set_irqs(IrqIndex.MSIX, NONE_TRIGGER, 1, 1)
    assert [read_eventfd(fd) for fd in fds] == [0, 1, 0]
    for fd in fds:
        os.close(fd)


def test_eventfd_replacement_closes_the_old_one(server: RunningServer,
                                               client: VfioUserClient) -> None:
    fds = client.install_msix_eventfds(3)
    held = server.open_fds()
    for _ in range(10):  # what QEMU does on every unmask
        new = os.eventfd(0)
        client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 1, 1, [new])
        os.close(new)
    assert server.open_fds() == held
    client.set_irqs(IrqIndex.MSIX, NONE_TRIGGER, 0, 0)  # disable all
    assert server.open_fds() == held - 3
    for fd in fds:
        os.close(fd)
    counters = server.counters()["devices"]["vf0"]
    assert counters["eventfd_swaps"] == 10


def test_partial_deassign_closes_exactly_that_range(server: RunningServer,
                                                   client: VfioUserClient) -> None:
    client.install_msix_eventfds(3)
    held = server.open_fds()
    client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 1, 2)  # "-1" entries: de-assign 1..2
    assert server.open_fds() == held - 2


@pytest.mark.parametrize(
    ("index", "flags", "start", "count", "nfds"),
    [
        (IrqIndex.MSIX, EVENTFD_TRIGGER, 2, 2, 2),  # beyond the vector count
        (IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 3, 2),  # fd count mismatch
        (IrqIndex.ERR, EVENTFD_TRIGGER, 0, 2, 2),  # ERR takes one vector
        (5, EVENTFD_TRIGGER, 0, 1, 1),  # no such index
        (IrqIndex.MSIX, SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_MASK, 0, 1, 1),
        (IrqIndex.MSIX, NONE_TRIGGER, 1, 0, 0),  # count 0 only from start 0
    ],
)
def test_bad_set_irqs_is_refused_and_fds_closed(
    server: RunningServer, client: VfioUserClient,
    index: int, flags: int, start: int, count: int, nfds: int,
) -> None:
    before = server.open_fds()
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        assert _errno_of(
            lambda: client.set_irqs(index, flags, start, count, fds)
        ) == errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)
    assert server.open_fds() == before


# -- raw wire ----------------------------------------------------------------
def _raw(server: RunningServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.socket_path)
    return s


def test_first_message_must_be_version(server: RunningServer) -> None:
    with _raw(server) as s:
        s.sendall(HEADER_STRUCT.pack(7, 4, 32, 0, 0) + struct.pack("<IIII", 16, 0, 0, 0))
        reply = s.recv(64)
        msg_id, command, size, flags, err = HEADER_STRUCT.unpack(reply[:16])
        assert (msg_id, command, size, flags & 0x20, err) == (7, 4, 16, 0x20, errno.EINVAL)
        assert s.recv(64) == b""  # and then the server hangs up
    with server.client() as c:
        assert c.device_info().num_irqs == 5


def test_bad_major_is_refused(server: RunningServer) -> None:
    with _raw(server) as s:
        body = struct.pack("<HH", 1, 0) + b"{}\0"
        s.sendall(HEADER_STRUCT.pack(1, 1, 16 + len(body), 0, 0) + body)
        _, _, _, flags, err = HEADER_STRUCT.unpack(s.recv(64)[:16])
        assert flags & 0x20 and err
    assert server.alive()


def test_undersized_header_disconnects_and_server_survives(server: RunningServer) -> None:
    with _raw(server) as s:
        s.sendall(HEADER_STRUCT.pack(1, 1, 8, 0, 0))
        data = s.recv(64)
        while data and len(data) < 64:
            more = s.recv(64)
            if not more:
                break
            data += more
    with server.client() as c:
        assert c.device_info().num_regions == 9


@pytest.mark.parametrize("command", [0, 14, 16, 17, 18, 19, 999])
def test_unsupported_commands_get_errors_and_stream_stays_in_sync(
    client: VfioUserClient, command: int
) -> None:
    msg_id = 4242
    client.channel.send(HEADER_STRUCT.pack(msg_id, command, 24, 0, 0) + bytes(8))
    assert client.read32(RegionIndex.CONFIG, 0) == 0x10CA8086


def test_garbage_stream_never_kills_the_server(server: RunningServer) -> None:
    rng = bytes((i * 7919 + 13) & 0xFF for i in range(4096))
    for start in range(0, 4096, 512):
        with _raw(server) as s:
            s.sendall(rng[start : start + 512])
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    with server.client() as c:
        assert c.device_info().num_regions == 9
    assert server.alive()


def test_oversized_message_is_refused_without_allocating(server: RunningServer) -> None:
    with server.client() as c:
        c.channel.send(HEADER_STRUCT.pack(9, 10, 0x7FFFFFFF, 0, 0))
        try:
            data = c.channel.sock.recv(64)
        except ConnectionResetError:
            data = b""
        assert data == b"" or HEADER_STRUCT.unpack(data[:16])[3] & 0x20
    assert server.alive()



# -- review findings: one bad client must not hurt the server ---------------------
def test_non_eventfd_is_refused_and_closed(server: RunningServer, client: VfioUserClient) -> None:
    before = server.open_fds()
    r, w = os.pipe()
    try:
        err = _errno_of(lambda: client.set_irqs(IrqIndex.MSIX, EVENTFD_TRIGGER, 0, 1, [w]))
        assert err == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    assert server.open_fds() == before


def test_write_multi_with_reply_requested_gets_exactly_one_answer(
    client: VfioUserClient,
) -> None:
    bad = m.WriteMultiEntry(1 << 20, RegionIndex.BAR0, 4, bytes(4))
    good = m.WriteMultiEntry(0x3C, RegionIndex.CONFIG, 1, b"\x05")
    with pytest.raises(ServerError) as info:
        client.call(m.RegionWriteMultiRequest((bad, good, bad)), m.RegionWriteMultiReply)
    assert info.value.errno == errno.EINVAL
    # The good entry was applied, and the next reply belongs to the next request.
    assert client.region_read(RegionIndex.CONFIG, 0x3C, 1) == b"\x05"


def test_client_that_stops_reading_is_dropped_and_server_keeps_serving(
    server: RunningServer,
) -> None:
    stuck = server.client()
    stuck.channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = m.RegionReadRequest(0, RegionIndex.CONFIG, 4096)
    for _ in range(600):  # ~2.4 MB of replies nobody reads
        try:
            stuck.send(request)
        except (OSError, ChannelClosed):
            break  # the server already dropped us
    # The server gives up on the stuck client after its send timeout and
    # accepts the next one.
    deadline = time.monotonic() + 15
    while True:
        try:
            with server.client(timeout=3.0) as c:
                assert c.device_info().num_regions == 9
            break
        except (OSError, TimeoutError):
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.2)
    stuck.close()
    assert server.alive()


def test_silent_control_clients_do_not_stall_the_device(
    server: RunningServer, client: VfioUserClient
) -> None:
    silent = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.control_path)
        silent.append(s)
    start = time.monotonic()
    for _ in range(5):
        client.read32(RegionIndex.CONFIG, 0)
    assert time.monotonic() - start < 1.5
    for s in silent:
        s.close()
    assert server.counters()["devices"]["vf0"]["connected"]


def test_a_flood_of_bad_posted_writes_is_counted_but_not_all_logged(
    server: RunningServer, client: VfioUserClient
) -> None:
    for _ in range(50):
        client.region_write(RegionIndex.BAR0, 1 << 20, b"\0\0\0\0", posted=True)
    assert client.read32(RegionIndex.CONFIG, 0) == 0x10CA8086  # in step, nothing answered
    counters = server.counters()["devices"]["vf0"]["messages"]
    assert counters["REGION_WRITE"]["errors"] == 50
    assert server.log().count("session.posted_failed") == 10

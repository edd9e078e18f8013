"""GET_REGION_INFO with the sparse-mmap capability, for a device that offers mappable areas.

The 82576 VF offers none (any mmap turns QEMU's posted writes off), so this
runs a small second PciFunction on the real engine, in-process, over a real
socket: the argsz retry, the capability chain and the fd all as QEMU reads them.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vmsi_server.client.client import ServerError, VfioUserClient
from vmsi_server.pci.function import AccessError, IrqSpec, PciFunction, RegionSpec
from vmsi_server.protocol.constants import RegionInfoFlags
from vmsi_server.server import Server

BAR_SIZE = 0x4000
AREAS = ((0x1000, 0x1000), (0x3000, 0x1000))
RW = RegionInfoFlags.READ | RegionInfoFlags.WRITE


class MappableBarDevice(PciFunction):
    """BAR0 backed by a memfd, two pages of it mappable; config space is plain bytes."""

    name = "mappable"

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.memfd_create("bar0")
        os.ftruncate(self.fd, BAR_SIZE)
        self.bar = mmap.mmap(self.fd, BAR_SIZE)
        self.config = bytearray(256)

    @property
    def regions(self) -> Sequence[RegionSpec]:
        return [RegionSpec(0, BAR_SIZE, RW, AREAS)] + [RegionSpec(i) for i in range(1, 7)] + [
            RegionSpec(7, 256, RW)
        ]

    @property
    def irq_specs(self) -> Sequence[IrqSpec]:
        return [IrqSpec(i) for i in range(5)]

    def region_fd(self, index: int) -> int | None:
        return self.fd if index == 0 else None

    def read(self, region: int, offset: int, count: int) -> bytes:
        if region == 0:
            return bytes(self.bar[offset : offset + count])
        if region == 7:
            return bytes(self.config[offset : offset + count])
        raise AccessError(errno.EINVAL, "absent region")

    def write(self, region: int, offset: int, data: memoryview) -> None:
        if region != 0:
            raise AccessError(errno.EINVAL, "read-only")
        self.bar[offset : offset + len(data)] = data

    def reset(self) -> None:
        self.bar[:] = bytes(BAR_SIZE)


@pytest.fixture
def mappable_server(tmp_path: Path) -> Iterator[tuple[str, MappableBarDevice]]:
    server = Server()
    device = MappableBarDevice()
    sock = str(tmp_path / "m.sock")
    server.add_function(device, socket_path=sock)
    thread = threading.Thread(target=server.loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock, device
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
        thread.join(5)
        server.close()


def test_region_info_argsz_retry_and_sparse_mmap(
    mappable_server: tuple[str, MappableBarDevice],
) -> None:
    sock, _device = mappable_server
    with VfioUserClient(sock) as c:
        short = c.region_info(0)  # QEMU asks with 32 first
        needed = 32 + 16 + 16 * len(AREAS)
        assert short.argsz == needed
        assert short.caps == b"" and short.fd is None  # never more than was asked
        full = c.region_info(0, argsz=needed)
        assert full.flags & RegionInfoFlags.MMAP and full.flags & RegionInfoFlags.CAPS
        assert full.cap_offset == 32
        cap_id, version, nxt, nr_areas = struct.unpack_from("<HHII", full.caps, 0)
        assert (cap_id, version, nxt, nr_areas) == (1, 1, 0, len(AREAS))
        areas = [struct.unpack_from("<QQ", full.caps, 16 + 16 * i) for i in range(nr_areas)]
        assert tuple(areas) == AREAS
        # The fd really is the BAR: what the client maps, the device sees.
        assert full.fd is not None
        view = mmap.mmap(full.fd, BAR_SIZE)
        view[0x1000:0x1004] = b"\xde\xad\xbe\xef"
        assert c.region_read(0, 0x1000, 4) == b"\xde\xad\xbe\xef"
        view.close()
        os.close(full.fd)
        # Regions without mappable areas carry neither caps nor an fd.
        config = c.region_info(7, argsz=needed)
        assert config.fd is None and config.caps == b"" and config.argsz == 32


def test_device_refusal_becomes_an_error_reply(
    mappable_server: tuple[str, MappableBarDevice],
) -> None:
    sock, _ = mappable_server
    with VfioUserClient(sock) as c:
        with pytest.raises(ServerError) as info:
            c.region_write(7, 0, b"\x01")
        assert info.value.errno == errno.EINVAL
        assert c.region_read(0, 0, 4) == bytes(4)  # still serving

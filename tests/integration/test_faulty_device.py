"""A device whose attach or detach fails must not leave its endpoint refusing clients."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from vmsi_server.client.client import VfioUserClient
from vmsi_server.pci.function import AccessError, FunctionHost, IrqSpec, PciFunction, RegionSpec
from vmsi_server.protocol.constants import RegionInfoFlags
from vmsi_server.server import Endpoint, Server
from vmsi_server.transport.channel import ChannelClosed


class FaultyDevice(PciFunction):
    """Config space only; the first attach or detach raises, as a device bug would."""

    name = "faulty"

    def __init__(self, fail_attach: bool, fail_detach: bool) -> None:
        super().__init__()
        self.fail_attach = fail_attach
        self.fail_detach = fail_detach

    @property
    def regions(self) -> Sequence[RegionSpec]:
        rw = RegionInfoFlags.READ | RegionInfoFlags.WRITE
        return [RegionSpec(i) for i in range(7)] + [RegionSpec(7, 256, rw)]

    @property
    def irq_specs(self) -> Sequence[IrqSpec]:
        return [IrqSpec(i) for i in range(5)]

    def attach(self, host: FunctionHost) -> None:
        if self.fail_attach:
            self.fail_attach = False
            raise RuntimeError("attach bug")
        super().attach(host)

    def detach(self) -> None:
        super().detach()
        if self.fail_detach:
            self.fail_detach = False
            raise RuntimeError("detach bug")

    def read(self, region: int, offset: int, count: int) -> bytes:
        return bytes(count)

    def write(self, region: int, offset: int, data: memoryview) -> None:
        raise AccessError(errno.EINVAL, "read-only")

    def reset(self) -> None:
        pass


def serve(tmp_path: Path, device: FaultyDevice) -> Iterator[tuple[str, Endpoint]]:
    server = Server()
    sock = str(tmp_path / "f.sock")
    endpoint = server.add_function(device, socket_path=sock)
    thread = threading.Thread(target=server.loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock, endpoint
    finally:
        server.loop.call_soon_threadsafe(server.loop.stop)
        thread.join(5)
        server.close()


@pytest.fixture
def failing_detach(tmp_path: Path) -> Iterator[tuple[str, Endpoint]]:
    yield from serve(tmp_path, FaultyDevice(fail_attach=False, fail_detach=True))


@pytest.fixture
def failing_attach(tmp_path: Path) -> Iterator[tuple[str, Endpoint]]:
    yield from serve(tmp_path, FaultyDevice(fail_attach=True, fail_detach=False))


def test_failing_detach_still_frees_the_endpoint(
    failing_detach: tuple[str, Endpoint],
) -> None:
    sock, endpoint = failing_detach
    with VfioUserClient(sock) as c:
        assert c.read32(7, 0) == 0
    with VfioUserClient(sock) as c:  # not refused as "busy"
        assert c.read32(7, 0) == 0
    assert endpoint.refused == 0
    assert endpoint.sessions_served == 2


def test_failing_attach_drops_that_client_only(failing_attach: tuple[str, Endpoint]) -> None:
    sock, endpoint = failing_attach
    with pytest.raises((ChannelClosed, OSError)):
        VfioUserClient(sock, timeout=2.0)
    with VfioUserClient(sock) as c:
        assert c.read32(7, 0) == 0
    assert endpoint.refused == 0

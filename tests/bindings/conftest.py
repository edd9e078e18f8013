"""Fixtures for the libvfio-user bindings: the library (or a skip saying why), and a
VF served on it in-process, its loop in a thread, reached by the project's client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsi_server.client.client import VfioUserClient
from vmsi_server.nic.pf import Pf
from vmsi_server.nic.vf_function import Igb82576Vf


@pytest.fixture(scope="session")
def library_path() -> str:
    from bindings.libvfio_user import available, resolve_path

    reason = available()
    if reason is not None:
        pytest.skip(f"libvfio-user not installed: {reason}")
    return resolve_path()


@dataclass
class Served:
    server: object  # bindings.adapter.LibvfioUserServer
    device: object  # bindings.adapter.LibvfioUserDevice
    vf: Igb82576Vf
    socket_path: str

    def client(self) -> VfioUserClient:
        return VfioUserClient(self.socket_path, timeout=5)


@pytest.fixture
def served(library_path: str, tmp_path: Path) -> Iterator[Served]:
    from bindings.adapter import LibvfioUserServer

    server = LibvfioUserServer(library_path)
    vf = Igb82576Vf(Pf(1), 0, server.loop)
    path = str(tmp_path / "vf0.sock")
    device = server.add_function(vf, socket_path=path)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            server.loop.run_once(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Served(server, device, vf, path)
    finally:
        stop.set()
        thread.join(5)
        server.close()
        vf.close()

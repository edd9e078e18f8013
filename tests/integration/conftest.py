"""A real server process per test module, reached over its real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsi_server.client.client import VfioUserClient
from vmsi_server.telemetry.control import query

from .backends import mark_differences, selected, server_args


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    socket_path: str
    control_path: str
    log_path: Path

    def client(self, **kwargs: object) -> VfioUserClient:
        return VfioUserClient(self.socket_path, **kwargs)  # type: ignore[arg-type]

    def counters(self) -> dict:  # type: ignore[type-arg]
        return query(self.control_path)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(tmp: Path, *args: str, name: str = "vf0") -> RunningServer:
    sock = str(tmp / f"{name}.sock")
    ctl = str(tmp / f"{name}.ctl")
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmsi_server", "--socket-path", sock,
             "--control-socket", ctl, *args],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while not (os.path.exists(sock) and os.path.exists(ctl)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.02)
    return RunningServer(proc, sock, ctl, log_path)


def stop_server(server: RunningServer) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_differences(items, Path(__file__).parent)


@pytest.fixture(params=selected())
def backend(request: pytest.FixtureRequest) -> str:
    """The protocol backend under test (VMSI_TEST_BACKENDS; see backends.py)."""
    return str(request.param)


@pytest.fixture
def server(tmp_path: Path, backend: str) -> Iterator[RunningServer]:
    srv = start_server(tmp_path, *server_args(backend))
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture
def client(server: RunningServer) -> Iterator[VfioUserClient]:
    with server.client() as c:
        yield c

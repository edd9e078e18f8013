"""Listener, clients coming and going, signals: the server keeps serving."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmsi_server.client.client import VfioUserClient
from vmsi_server.protocol.constants import RegionIndex

from .conftest import RunningServer, start_server, stop_server

INTERRUPT_LINE = 0x3C


def test_socket_file_is_private(server: RunningServer) -> None:
    mode = os.stat(server.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_sigterm_stops_cleanly_and_removes_socket(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    with srv.client():
        pass
    assert stop_server(srv) == 0
    assert not os.path.exists(srv.socket_path)
    assert "server.stopped" in srv.log()


def test_sigterm_with_client_connected(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    c = srv.client()
    try:
        assert stop_server(srv) == 0
        assert not os.path.exists(srv.socket_path)
    finally:
        c.close()


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "vf0.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound but nobody listens: what a crashed server leaves
    srv = start_server(tmp_path)
    try:
        with srv.client() as c:
            assert c.device_info().num_regions == 9
    finally:
        stop_server(srv)


def test_live_socket_is_not_stolen(server: RunningServer, tmp_path: Path) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "vmsi_server", "--socket-path", server.socket_path,
         "--no-slowpath"],
        capture_output=True, timeout=30,
    )
    assert second.returncode != 0
    assert b"already listening" in second.stderr
    with server.client() as c:  # the first server is untouched
        assert c.device_info().num_irqs == 5


def test_regular_file_at_socket_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    result = subprocess.run(
        [sys.executable, "-m", "vmsi_server", "--socket-path", str(path), "--no-slowpath"],
        capture_output=True, timeout=30,
    )
    assert result.returncode != 0
    assert path.read_text() == "precious"


def test_second_client_is_refused_while_first_is_served(server: RunningServer) -> None:
    with server.client() as first:
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(server.socket_path)
        second.settimeout(5)
        assert second.recv(16) == b""  # closed without a word
        second.close()
        assert first.device_info().num_regions == 9  # the first is still served
    counters = server.counters()
    assert counters["devices"]["vf0"]["clients_refused"] == 1


def test_reconnect_keeps_device_state_and_drops_client_resources(
    server: RunningServer,
) -> None:
    baseline_fds = server.open_fds()
    with server.client() as c:
        c.region_write(RegionIndex.CONFIG, INTERRUPT_LINE, b"\x2a")
        c.map_ram(0x100000, 1 << 20)
        c.install_msix_eventfds(3)
        assert server.open_fds() > baseline_fds
    _wait(lambda: server.open_fds() == baseline_fds)
    with server.client() as c:
        # Device state survives the client (vfio-user spec), its fds do not.
        assert c.region_read(RegionIndex.CONFIG, INTERRUPT_LINE, 1) == b"\x2a"
    counters = server.counters()
    assert counters["devices"]["vf0"]["sessions_served"] == 2


def test_many_reconnects(server: RunningServer) -> None:
    for _ in range(20):
        with server.client() as c:
            assert c.read32(RegionIndex.CONFIG, 0) == 0x10CA8086


def test_client_vanishing_mid_message(server: RunningServer) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(server.socket_path)
    raw.sendall(b"\x00\x00\x01\x00\x40\x00\x00\x00")  # half a VERSION header
    raw.close()
    with server.client() as c:
        assert c.device_info().num_regions == 9
    assert server.alive()


def test_device_reset_over_protocol(client: VfioUserClient) -> None:
    client.region_write(RegionIndex.CONFIG, INTERRUPT_LINE, b"\x07")
    client.reset()
    assert client.region_read(RegionIndex.CONFIG, INTERRUPT_LINE, 1) == b"\x00"


@pytest.mark.parametrize("policy", ["shadow", "legacy", "forward-all"])
def test_every_policy_starts_and_serves(tmp_path: Path, policy: str) -> None:
    srv = start_server(tmp_path, "--msix-policy", policy)
    try:
        with srv.client() as c:
            assert c.read32(RegionIndex.CONFIG, 0) == 0x10CA8086
        assert srv.counters()["policy"] == policy
    finally:
        assert stop_server(srv) == 0


def _wait(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_vmsi_ctl_prints_live_counters(server: RunningServer) -> None:
    with server.client() as c:
        c.read32(RegionIndex.CONFIG, 0)
        out = subprocess.run(
            [sys.executable, "-m", "vmsi_server.ctl", "--control-socket", server.control_path],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    assert "vf0" in out and "connected" in out
    assert re.search(r"REGION_READ\s+1\b", out), out
    assert "policy: shadow" in out

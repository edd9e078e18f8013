"""A real ``vmsi-server --vfs N`` per test, in a temporary directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.seed_table import ServerProcess

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    started: list[ServerProcess] = []

    def start(vfs: int, policy: str, *, time_fast_path: bool = True) -> ServerProcess:
        workdir = tmp_path / f"{policy}-{len(started)}"
        workdir.mkdir()
        server = ServerProcess(workdir, vfs, policy, time_fast_path=time_fast_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

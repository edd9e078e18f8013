from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmsi_server.msix.controller import MsixController
from vmsi_server.msix.layout import IGBVF_GEOMETRY
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.msix.slowpath import SlowPath
from vmsi_server.telemetry.counters import Counters

from .helpers import Lines


@pytest.fixture
def lines() -> Iterator[Lines]:
    lines = Lines()
    yield lines
    lines.close()


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def ctrl(counters: Counters) -> MsixController:
    """A fast path with no device model behind it (every decision is fast)."""
    return MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, None, 0, counters)


@pytest.fixture
def live(ctrl: MsixController, lines: Lines) -> MsixController:
    """Enabled, not function-masked, eventfds on all vectors, all entries masked.

    The client forwards the table (it masks every entry, as Linux does at MSI-X
    setup), so the table's mask bits gate delivery.
    """
    ctrl.attach(lines.irqs)
    for vector in range(ctrl.geometry.vectors):
        ctrl.table_write(vector * 16 + 12, (1).to_bytes(4, "little"))
    lines.install(ctrl, 0, 1, 2)
    ctrl.control_changed(enabled=True, function_masked=False)
    return ctrl


@pytest.fixture
def slow_path(counters: Counters) -> Iterator[SlowPath]:
    sp = SlowPath(timeout=0.5, counters=counters, fault_hooks=True)
    sp.start()
    yield sp
    sp.close()

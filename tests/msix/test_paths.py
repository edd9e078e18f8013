"""Path policies against a real slow-path worker process.

Each check counts round trips twice: from the controller's counters, and from
the worker's own count of requests served (Op.STATS), so a decision that
claims "fast" while still talking to the worker (or the reverse) fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from vmsi_server.msix.controller import MsixController
from vmsi_server.msix.ioreq import Op
from vmsi_server.msix.layout import IGBVF_GEOMETRY
from vmsi_server.msix.policy import DECISIONS, AccessKind, Path, PathPolicy
from vmsi_server.msix.slowpath import SlowPath
from vmsi_server.pci.function import IrqRequest, apply_irq_eventfds
from vmsi_server.protocol.constants import IrqIndex
from vmsi_server.telemetry.counters import Counters

from .helpers import ADDR, CONTROL, F, Lines, irq, new_eventfd, r32, r64, unmask, w32, w64

SHADOW, LEGACY, FORWARD_ALL = PathPolicy.SHADOW, PathPolicy.LEGACY, PathPolicy.FORWARD_ALL


def served(sp: SlowPath) -> int:
    return sp.call(Op.STATS, 0)


def round_trips(sp: SlowPath, action: Callable[[], object]) -> int:
    """Requests the worker served during ``action`` (the STATS probe itself excluded)."""
    before = served(sp)
    action()
    return served(sp) - before - 1


def make(
    policy: PathPolicy, sp: SlowPath, counters: Counters, lines: Lines, fid: int = 0
) -> MsixController:
    ctrl = MsixController(IGBVF_GEOMETRY, policy, sp, fid, counters)
    ctrl.attach(lines.irqs)
    return ctrl


def swap_request(lines: Lines, vector: int) -> IrqRequest:
    fd = new_eventfd()
    req = IrqRequest(IrqIndex.MSIX, F.ACTION_TRIGGER | F.DATA_EVENTFD, vector, 1, (fd,))
    return apply_irq_eventfds(lines.irqs, req)


# (name, action, expected round trips under shadow, legacy, forward-all)
ACTIONS: list[tuple[str, Callable[[MsixController, Lines], object], tuple[int, int, int]]] = [
    ("read address dword", lambda c, _: r32(c, 0x10), (0, 1, 1)),
    ("read data dword", lambda c, _: r32(c, 0x18), (0, 1, 1)),
    ("read control dword", lambda c, _: r32(c, 0x10 + CONTROL), (0, 0, 1)),
    ("read address qword", lambda c, _: r64(c, 0x10), (0, 1, 1)),
    ("read data+control qword", lambda c, _: r64(c, 0x18), (0, 1, 1)),
    ("read PBA qword", lambda c, _: c.pba_read(0, 8), (0, 1, 1)),
    ("read PBA dword", lambda c, _: c.pba_read(4, 4), (0, 1, 1)),
    ("write PBA", lambda c, _: c.pba_write(0, bytes(8)), (0, 0, 1)),
    ("write address dword", lambda c, _: w32(c, 0x10, ADDR), (1, 1, 1)),
    ("write data dword", lambda c, _: w32(c, 0x18, 0x41), (1, 1, 1)),
    ("write address qword", lambda c, _: w64(c, 0x10, ADDR | 1 << 32), (1, 1, 1)),
    ("write data+control qword", lambda c, _: w64(c, 0x18, 0x42), (1, 1, 1)),
    ("write control (unmask)", lambda c, _: unmask(c, 1), (0, 0, 1)),
    ("message control", lambda c, _: c.control_changed(True, False), (0, 0, 1)),
    ("set_irqs mask", lambda c, _: c.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 1, 1)), (0, 0, 1)),
    (
        "set_irqs unmask",
        lambda c, _: c.set_irqs(irq(F.ACTION_UNMASK | F.DATA_NONE, 1, 1)),
        (0, 0, 1),
    ),
    (
        "set_irqs trigger",
        lambda c, _: c.set_irqs(irq(F.ACTION_TRIGGER | F.DATA_NONE, 1, 1)),
        (0, 0, 1),
    ),
    ("set_irqs eventfd swap", lambda c, lines: c.set_irqs(swap_request(lines, 1)), (0, 0, 1)),
    (
        "set_irqs disable-all",
        lambda c, _: c.set_irqs(irq(F.ACTION_TRIGGER | F.DATA_NONE, 0, 0)),
        (0, 0, 1),
    ),
    ("device trigger", lambda c, _: c.trigger(1), (0, 0, 0)),
]


@pytest.mark.parametrize("policy", [SHADOW, LEGACY, FORWARD_ALL], ids=lambda p: p.value)
@pytest.mark.parametrize("case", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_round_trips_per_access_kind(
    policy: PathPolicy,
    case: tuple[str, Callable[[MsixController, Lines], object], tuple[int, int, int]],
    slow_path: SlowPath,
    counters: Counters,
    lines: Lines,
) -> None:
    _name, action, expected = case
    ctrl = make(policy, slow_path, counters, lines)
    lines.install(ctrl, 0, 1, 2)
    want = expected[[SHADOW, LEGACY, FORWARD_ALL].index(policy)]
    assert round_trips(slow_path, lambda: action(ctrl, lines)) == want


def test_shadow_forwards_no_reads_at_all(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(SHADOW, slow_path, counters, lines)
    before = served(slow_path)
    for offset in range(0, 48, 4):
        r32(ctrl, offset)
    for offset in range(0, 48, 8):
        r64(ctrl, offset)
    ctrl.pba_read(0, 8)
    assert served(slow_path) - before == 1
    assert slow_path.counters.access_count("slowpath", "table_read", "round-trip") == 0
    assert counters.access_count("msix-table", "read-addr-data", "fast") == 9
    assert counters.access_count("msix-table", "read-control", "fast") == 3
    assert counters.access_count("msix-table", "read-qword", "fast") == 6


def test_legacy_counts_forwarded_versus_fast(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(LEGACY, slow_path, counters, lines)
    for _ in range(5):
        r32(ctrl, 0)  # address: forwarded
        r32(ctrl, CONTROL)  # control: fast (pre-2010 vmsi.c)
        ctrl.pba_read(0, 8)  # PBA: forwarded
    assert counters.access_count("msix-table", "read-addr-data", "forward") == 5
    assert counters.access_count("msix-table", "read-control", "fast") == 5
    assert counters.access_count("msix-pba", "read", "forward") == 5
    assert counters.access_count("msix-table", "read-addr-data", "fast") == 0
    assert slow_path.counters.access_count("slowpath", "table_read", "round-trip") == 5
    assert slow_path.counters.access_count("slowpath", "pba_read", "round-trip") == 5


def test_forward_all_counts_every_event_as_round_trip(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(FORWARD_ALL, slow_path, counters, lines)
    lines.install(ctrl, 0)
    ctrl.control_changed(True, False)
    unmask(ctrl, 0)
    r32(ctrl, CONTROL)
    ctrl.set_irqs(swap_request(lines, 0))
    ctrl.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 0, 1))
    snap = counters.snapshot()
    paths = {(a["region"], a["kind"]): a["path"] for a in snap["accesses"]}
    for key in [
        ("msix-config", "message-control"),
        ("msix-table", "write-control"),
        ("msix-irqs", "eventfd-install"),
        ("msix-irqs", "eventfd-swap"),
        ("msix-irqs", "mask"),
    ]:
        assert paths[key] == "write-through", key
    assert paths[("msix-table", "read-control")] == "forward"
    assert counters.get("qemu.eventfd_swap") == 1


def test_decision_table_is_complete_and_matches_the_brief() -> None:
    for policy in PathPolicy:
        assert set(DECISIONS[policy]) == set(AccessKind)
    assert all(p is not Path.FORWARD for k, p in DECISIONS[SHADOW].items() if "READ" in k.name)
    assert DECISIONS[LEGACY][AccessKind.TABLE_READ_CONTROL] is Path.FAST
    assert DECISIONS[LEGACY][AccessKind.TABLE_WRITE_CONTROL] is Path.FAST
    assert all(p.round_trip for p in DECISIONS[FORWARD_ALL].values())
    assert PathPolicy.parse("forward-all") is FORWARD_ALL
    assert PathPolicy.parse("Forward_All") is FORWARD_ALL
    with pytest.raises(ValueError):
        PathPolicy.parse("fast")


# -- forwarded answers are the slow path's, and the copies agree ---------------


def test_legacy_returns_the_slow_paths_answer(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    legacy = make(LEGACY, slow_path, counters, lines, fid=1)
    shadow = make(SHADOW, slow_path, counters, lines, fid=2)
    for ctrl in (legacy, shadow):
        w32(ctrl, 0x10, ADDR | 0x100)
    # Change the device-side copies behind the fast paths' backs.
    slow_path.call(Op.TABLE_WRITE, 1, 0x10, 4, 0xDEAD_BEE0)
    slow_path.call(Op.TABLE_WRITE, 2, 0x10, 4, 0xDEAD_BEE0)
    assert r32(legacy, 0x10) == 0xDEAD_BEE0  # forwarded: the worker answered
    assert r32(shadow, 0x10) == ADDR | 0x100  # shadowed: the worker was not asked


def test_forwarded_reads_take_control_and_pba_from_the_fast_path(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(LEGACY, slow_path, counters, lines)
    lines.install(ctrl, 0, 1, 2)
    ctrl.control_changed(True, False)
    w32(ctrl, 0x18, 0x77)
    assert r64(ctrl, 0x18) == (1 << 32) | 0x77  # masked at power-on
    unmask(ctrl, 1)  # fast path only under legacy
    assert r64(ctrl, 0x18) == 0x77  # forwarded, and reports the unmask
    ctrl.trigger(2)
    assert int.from_bytes(ctrl.pba_read(0, 8), "little") == 0b100
    assert int.from_bytes(ctrl.pba_read(0, 4), "little") == 0b100
    assert counters.access_count("msix-pba", "read", "forward") == 2


@pytest.mark.parametrize("policy", [SHADOW, LEGACY, FORWARD_ALL], ids=lambda p: p.value)
def test_slow_path_table_matches_shadow_after_writes(
    policy: PathPolicy, slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(policy, slow_path, counters, lines, fid=7)
    rng = random.Random(policy.value)
    for _ in range(200):
        vector = rng.randrange(3)
        field = rng.choice([0, 4, 8])
        if rng.random() < 0.5:
            w32(ctrl, vector * 16 + field, rng.getrandbits(32))
        elif field != 4:
            w64(ctrl, vector * 16 + field, rng.getrandbits(64))
        if rng.random() < 0.3:
            w32(ctrl, vector * 16 + CONTROL, rng.getrandbits(1))
    for vector in range(3):
        lo, hi, data, control = ctrl.entry(vector)
        base = vector * 16
        assert slow_path.call(Op.TABLE_READ, 7, base, 4, control) == lo
        assert slow_path.call(Op.TABLE_READ, 7, base + 4, 4, control) == hi
        assert slow_path.call(Op.TABLE_READ, 7, base + 8, 4, control) == data
        assert not ctrl.dirty(vector)


def test_forward_all_control_read_reports_the_fast_paths_mask_bit(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = make(FORWARD_ALL, slow_path, counters, lines, fid=3)
    unmask(ctrl, 0)
    slow_path.call(Op.TABLE_WRITE, 3, CONTROL, 4, 1)  # a stale mask bit device-side
    assert r32(ctrl, CONTROL) == 0  # forwarded, but the mask bit is the fast path's
    assert counters.access_count("msix-table", "read-control", "forward") == 1

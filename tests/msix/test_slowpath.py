"""The slow-path supervisor: death, hangs, restarts, replay, CPU accounting."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

import pytest

from vmsi_server.msix.controller import MsixController
from vmsi_server.msix.ioreq import FaultHook, Op
from vmsi_server.msix.layout import IGBVF_GEOMETRY
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.msix.slowpath import SlowPath, SlowPathError
from vmsi_server.telemetry.counters import Counters

from .helpers import ADDR, CONTROL, F, Lines, irq, r32, unmask, w32, w64

TIMEOUT = 0.5


def device_entry(sp: SlowPath, fid: int, vector: int) -> tuple[int, int, int]:
    base = vector * 16
    return (
        sp.call(Op.TABLE_READ, fid, base, 4),
        sp.call(Op.TABLE_READ, fid, base + 4, 4),
        sp.call(Op.TABLE_READ, fid, base + 8, 4),
    )


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.01)


def test_worker_killed_between_calls_is_restarted_and_state_replayed(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.LEGACY, slow_path, 3, counters)
    w64(ctrl, 0x10, (0x1 << 32) | ADDR | 0x10)
    w32(ctrl, 0x18, 0x4021)
    old_pid = slow_path.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    wait_gone(old_pid)
    # The next forwarded access either fails (the channel died under it) or
    # succeeds after the restart; either way the worker is back afterwards.
    try:
        value = r32(ctrl, 0x10)
    except SlowPathError as e:
        assert e.errno in (errno.EIO, errno.ETIMEDOUT)
        value = r32(ctrl, 0x10)
    assert value == ADDR | 0x10  # answered by the new worker, from the replay
    assert slow_path.restarts == 1
    assert slow_path.pid not in (None, old_pid)
    assert device_entry(slow_path, 3, 1) == (ADDR | 0x10, 1, 0x4021)
    assert r32(ctrl, 0x10 + CONTROL) == 1  # fast path served throughout


def test_check_restarts_a_dead_worker_without_traffic(
    slow_path: SlowPath, counters: Counters
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, slow_path, 4, counters)
    w32(ctrl, 0x20, ADDR | 0x20)
    old_pid = slow_path.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    wait_gone(old_pid)
    assert slow_path.check() is True
    assert slow_path.restarts == 1
    assert slow_path.pid != old_pid
    assert device_entry(slow_path, 4, 2)[0] == ADDR | 0x20
    assert slow_path.check() is True
    assert slow_path.restarts == 1  # a live worker is left alone


def test_worker_death_mid_request_is_an_error_reply_and_serving_goes_on(
    slow_path: SlowPath, counters: Counters
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.LEGACY, slow_path, 5, counters)
    w32(ctrl, 0, ADDR)
    with pytest.raises(SlowPathError) as e:
        slow_path.call(Op.FAULT, 0, data=FaultHook.EXIT_NOW)
    assert e.value.errno == errno.EIO
    assert slow_path.errors == 1 and slow_path.restarts == 1
    assert r32(ctrl, 0) == ADDR  # forwarded to the new worker, replayed state


def test_hang_mid_write_is_bounded_counted_restarted_and_replayed(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, slow_path, 6, counters)
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 1)
    ctrl.control_changed(True, False)
    slow_path.call(Op.FAULT, 0, data=FaultHook.HANG_NEXT)
    old_pid = slow_path.pid
    t0 = time.monotonic()
    with pytest.raises(SlowPathError) as e:
        w32(ctrl, 0x10, ADDR | 0x30)  # the write-through the worker hangs on
    elapsed = time.monotonic() - t0
    assert e.value.errno == errno.ETIMEDOUT
    assert TIMEOUT <= elapsed < TIMEOUT + 2.0  # bounded: timeout + one restart
    assert slow_path.timeouts == 1 and slow_path.restarts == 1
    assert counters.access("msix-table", "write-addr-data", "write-through").errors == 1
    assert slow_path.pid != old_pid
    # The replay carried the shadow, new value included, and acknowledged it.
    assert device_entry(slow_path, 6, 1)[0] == ADDR | 0x30
    assert not ctrl.dirty(1)
    unmask(ctrl, 1)
    assert ctrl.trigger(1) is True
    assert lines.fired(1) == 1


def test_hang_on_forwarded_read_then_next_read_succeeds(
    slow_path: SlowPath, counters: Counters
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.LEGACY, slow_path, 8, counters)
    w32(ctrl, 0, ADDR | 4)
    slow_path.call(Op.FAULT, 0, data=FaultHook.HANG_NEXT)
    t0 = time.monotonic()
    with pytest.raises(SlowPathError) as e:
        r32(ctrl, 0)
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t0 < TIMEOUT + 2.0
    assert counters.access("msix-table", "read-addr-data", "forward").errors == 1
    assert r32(ctrl, 0) == ADDR | 4
    assert counters.access_count("msix-table", "read-addr-data", "forward") == 1


def test_hang_under_forward_all_set_irqs_still_applies_fast_path_state(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.FORWARD_ALL, slow_path, 9, counters)
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 0)
    ctrl.control_changed(True, False)
    unmask(ctrl, 0)
    slow_path.call(Op.FAULT, 0, data=FaultHook.HANG_NEXT)
    with pytest.raises(SlowPathError):
        ctrl.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 0, 1))
    assert ctrl.client_masked(0)  # the eventfd/mask state stays with the fast path
    assert ctrl.trigger(0) is False
    ctrl.set_irqs(irq(F.ACTION_UNMASK | F.DATA_NONE, 0, 1))
    assert lines.fired(0) == 1


def test_unmask_after_dirtying_write_waits_for_completion(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    """The completion hook: a vector whose new address the device model has
    not taken is not delivered, even though the guest unmasked it."""
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, slow_path, 10, counters)
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 2)
    ctrl.control_changed(True, False)
    good_argv = slow_path.argv
    slow_path.argv = [sys.executable, "-c", "pass"]  # restarts will fail
    slow_path.call(Op.FAULT, 0, data=FaultHook.HANG_NEXT)
    with pytest.raises(SlowPathError):
        w32(ctrl, 0x20, ADDR | 0x50)
    assert not slow_path.alive
    assert counters.get("slowpath.restart_failures") == 1
    assert ctrl.dirty(2)
    unmask(ctrl, 2)  # the guest unmasks right after changing the address
    assert ctrl.trigger(2) is False  # held: pending, no eventfd write
    assert lines.fired(2) == 0
    assert int.from_bytes(ctrl.pba_read(0, 8), "little") == 0b100
    assert r32(ctrl, 0x20) == ADDR | 0x50  # the shadow still answers reads
    slow_path.argv = good_argv
    assert slow_path.check() is True  # restart + replay = the completion
    assert not ctrl.dirty(2)
    assert lines.fired(2) == 1  # delivered once, at the hook
    assert not ctrl.pending(2)
    assert device_entry(slow_path, 10, 2)[0] == ADDR | 0x50


def test_write_through_completes_before_the_write_returns(
    slow_path: SlowPath, counters: Counters, lines: Lines
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, slow_path, 11, counters)
    w32(ctrl, 0, ADDR)
    assert not ctrl.dirty(0)
    assert device_entry(slow_path, 11, 0)[0] == ADDR


def test_worker_refusal_is_an_error_without_restart(slow_path: SlowPath) -> None:
    with pytest.raises(SlowPathError) as e:
        slow_path.call(Op.TABLE_READ, 999, 0, 4)  # unknown function
    assert e.value.errno == errno.EINVAL
    assert slow_path.restarts == 0 and slow_path.errors == 0
    assert slow_path.call(Op.PING, 0, data=42) == 42


def test_fault_hooks_are_refused_unless_enabled() -> None:
    with SlowPath(timeout=TIMEOUT) as sp:
        with pytest.raises(SlowPathError) as e:
            sp.call(Op.FAULT, 0, data=FaultHook.EXIT_NOW)
        assert e.value.errno == errno.EPERM
        assert sp.restarts == 0


def test_cpu_seconds_grow_with_forwarded_calls_and_survive_restarts(
    slow_path: SlowPath, counters: Counters
) -> None:
    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.LEGACY, slow_path, 12, counters)
    before = slow_path.cpu_seconds()
    for _ in range(20000):
        ctrl.table_read(0, 4)
    after = slow_path.cpu_seconds()
    assert after >= before + 0.02
    assert counters.snapshot()["gauges"]["cpu.slowpath_seconds"] >= after
    pid = slow_path.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert slow_path.check()
    assert slow_path.cpu_seconds() >= after  # the dead worker's CPU is kept


def test_close_ends_the_worker(counters: Counters) -> None:
    sp = SlowPath(timeout=TIMEOUT, counters=counters)
    sp.start()
    pid = sp.pid
    assert pid is not None
    sp.close()
    assert not os.path.exists(f"/proc/{pid}")  # exited on EOF and reaped
    assert not sp.alive


def test_event_loop_notices_a_dead_worker(slow_path: SlowPath, counters: Counters) -> None:
    from vmsi_server.transport.loop import EventLoop

    ctrl = MsixController(IGBVF_GEOMETRY, PathPolicy.SHADOW, slow_path, 13, counters)
    w32(ctrl, 0, ADDR | 8)
    loop = EventLoop()
    try:
        slow_path.watch(loop)
        old_pid = slow_path.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while slow_path.restarts == 0 and time.monotonic() < deadline:
            loop.run_once(0.1)
        assert slow_path.restarts == 1
        assert slow_path.pid != old_pid
        assert device_entry(slow_path, 13, 0)[0] == ADDR | 8
        loop.run_once(0.05)  # the new worker's channel is quiet: no further restart
        assert slow_path.restarts == 1
    finally:
        slow_path.close()
        loop.close()

"""PCI-spec MSI-X semantics of the fast path: masks, pending bits, delivery."""

from __future__ import annotations

import errno
import json

import pytest

from vmsi_server.msix.controller import MsixController
from vmsi_server.msix.layout import IGBVF_GEOMETRY, MsixGeometry
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.pci.function import AccessError, IrqRequest, apply_irq_eventfds
from vmsi_server.protocol.constants import IrqIndex
from vmsi_server.telemetry.counters import Counters

from .helpers import (
    ADDR,
    CONTROL,
    ENTRY,
    F,
    Lines,
    irq,
    mask,
    pba,
    r32,
    r64,
    unmask,
    w32,
    w64,
)

# -- power-on state ----------------------------------------------------------


def test_power_on_entries_masked_address_data_zero(ctrl: MsixController) -> None:
    for v in range(3):
        assert r32(ctrl, v * ENTRY) == 0
        assert r32(ctrl, v * ENTRY + 4) == 0
        assert r32(ctrl, v * ENTRY + 8) == 0
        assert r32(ctrl, v * ENTRY + CONTROL) == 1
    assert pba(ctrl) == 0
    assert not ctrl.enabled


def test_address_data_round_trip_by_dword_and_qword(ctrl: MsixController) -> None:
    w32(ctrl, 0x10, ADDR | 0x1000)
    w32(ctrl, 0x14, 0x1)
    w32(ctrl, 0x18, 0x4041)
    assert r64(ctrl, 0x10) == (1 << 32) | ADDR | 0x1000
    assert r64(ctrl, 0x18) == (1 << 32) | 0x4041  # data + control (still masked)
    w64(ctrl, 0x20, 0x2_FEE0_2000)
    assert (r32(ctrl, 0x20), r32(ctrl, 0x24)) == (0xFEE0_2000, 2)
    assert ctrl.entry(1) == (ADDR | 0x1000, 1, 0x4041, 1)


def test_vector_control_reserved_bits_read_zero(ctrl: MsixController) -> None:
    w32(ctrl, CONTROL, 0xFFFF_FFFF)
    assert r32(ctrl, CONTROL) == 1
    w32(ctrl, CONTROL, 0xFFFF_FFFE)
    assert r32(ctrl, CONTROL) == 0
    assert not ctrl.masked(0)
    w64(ctrl, 8, (0xFFFF_FFFF << 32) | 0x55)  # data + control in one QWORD
    assert r64(ctrl, 8) == (1 << 32) | 0x55


# -- trigger while it cannot be delivered -> pending, no eventfd write -------


def test_masked_vector_sets_pending_and_writes_no_eventfd(
    live: MsixController, lines: Lines
) -> None:
    assert live.trigger(1) is False
    assert lines.fired(1) == 0
    assert live.pending(1)
    assert pba(live) == 0b010
    assert int.from_bytes(live.pba_read(0, 4), "little") == 0b010
    assert int.from_bytes(live.pba_read(4, 4), "little") == 0


def test_unmask_by_table_write_delivers_once_and_clears_pba(
    live: MsixController, lines: Lines
) -> None:
    live.trigger(1)
    live.trigger(1)  # two events while masked: one pending bit, one delivery
    unmask(live, 1)
    assert lines.fired(1) == 1
    assert not live.pending(1)
    assert pba(live) == 0
    unmask(live, 1)  # unmasking again delivers nothing more
    assert lines.fired(1) == 0
    assert live.trigger(1) is True
    assert lines.fired(1) == 1
    assert pba(live) == 0


def test_unmasked_delivered_vector_does_not_touch_others(
    live: MsixController, lines: Lines
) -> None:
    unmask(live, 0)
    live.trigger(0)
    assert (lines.fired(0), lines.fired(1), lines.fired(2)) == (1, 0, 0)


def test_function_mask_pends_and_clearing_it_delivers_once(
    live: MsixController, lines: Lines
) -> None:
    unmask(live, 0)
    unmask(live, 2)
    live.control_changed(enabled=True, function_masked=True)
    live.trigger(0)
    live.trigger(2)
    assert (lines.fired(0), lines.fired(2)) == (0, 0)
    assert pba(live) == 0b101
    assert r32(live, CONTROL) == 0  # the function mask does not touch per-vector bits
    live.control_changed(enabled=True, function_masked=False)
    assert (lines.fired(0), lines.fired(2)) == (1, 1)
    assert pba(live) == 0


def test_disabled_pends_and_enable_delivers_once(live: MsixController, lines: Lines) -> None:
    unmask(live, 2)
    live.control_changed(enabled=False, function_masked=False)
    assert live.trigger(2) is False
    assert lines.fired(2) == 0
    assert live.pending(2)
    live.control_changed(enabled=True, function_masked=False)
    assert lines.fired(2) == 1
    assert not live.pending(2)


def test_no_eventfd_pends_and_install_delivers_once(ctrl: MsixController, lines: Lines) -> None:
    ctrl.attach(lines.irqs)
    ctrl.control_changed(enabled=True, function_masked=False)
    unmask(ctrl, 1)
    assert ctrl.trigger(1) is False
    assert ctrl.pending(1)
    lines.install(ctrl, 1)
    assert lines.fired(1) == 1
    assert not ctrl.pending(1)


def test_eventfd_install_for_masked_pending_vector_does_not_deliver(
    ctrl: MsixController, lines: Lines
) -> None:
    ctrl.attach(lines.irqs)
    mask(ctrl, 0)  # a client that forwards the table
    ctrl.control_changed(enabled=True, function_masked=False)
    ctrl.trigger(0)
    lines.install(ctrl, 0)
    assert lines.fired(0) == 0
    assert ctrl.pending(0)


def test_detached_trigger_pends_and_attach_delivers(ctrl: MsixController, lines: Lines) -> None:
    ctrl.control_changed(enabled=True, function_masked=False)
    unmask(ctrl, 0)
    assert ctrl.trigger(0) is False  # no IrqLines at all
    assert ctrl.pending(0)
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 0)
    assert lines.fired(0) == 1
    ctrl.detach()
    assert ctrl.trigger(0) is False
    assert lines.fired(0) == 0


# -- SET_IRQS MASK / UNMASK (the client mask) -------------------------------


def test_set_irqs_mask_pends_and_unmask_delivers_once(live: MsixController, lines: Lines) -> None:
    unmask(live, 0)
    live.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 0, 1))
    assert live.client_masked(0)
    assert r32(live, CONTROL) == 0  # the guest-visible mask bit is untouched
    live.trigger(0)
    assert lines.fired(0) == 0
    assert live.pending(0)
    live.set_irqs(irq(F.ACTION_UNMASK | F.DATA_NONE, 0, 1))
    assert lines.fired(0) == 1
    assert pba(live) == 0


def test_client_mask_and_table_mask_are_ored(live: MsixController, lines: Lines) -> None:
    live.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 1, 1))
    live.trigger(1)
    unmask(live, 1)  # table unmasked, client mask still set
    assert lines.fired(1) == 0
    live.set_irqs(irq(F.ACTION_UNMASK | F.DATA_NONE, 1, 1))
    assert lines.fired(1) == 1


def test_set_irqs_data_bool_selects_vectors(live: MsixController, lines: Lines) -> None:
    for v in range(3):
        unmask(live, v)
    live.set_irqs(irq(F.ACTION_MASK | F.DATA_BOOL, 0, 3, (True, False, True)))
    assert [live.client_masked(v) for v in range(3)] == [True, False, True]
    for v in range(3):
        live.trigger(v)
    assert [lines.fired(v) for v in range(3)] == [0, 1, 0]
    live.set_irqs(irq(F.ACTION_UNMASK | F.DATA_BOOL, 0, 3, (False, False, True)))
    assert [lines.fired(v) for v in range(3)] == [0, 0, 1]
    assert pba(live) == 0b001


def test_set_irqs_trigger_fires_through_trigger_semantics(
    live: MsixController, lines: Lines
) -> None:
    live.set_irqs(irq(F.ACTION_TRIGGER | F.DATA_NONE, 2, 1))
    assert lines.fired(2) == 0 and live.pending(2)  # masked: pends
    unmask(live, 2)
    assert lines.fired(2) == 1
    live.set_irqs(irq(F.ACTION_TRIGGER | F.DATA_BOOL, 0, 3, (False, False, True)))
    assert lines.fired(2) == 1


def test_set_irqs_out_of_range_and_wrong_index(ctrl: MsixController) -> None:
    with pytest.raises(AccessError) as e:
        ctrl.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 2, 2))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        ctrl.set_irqs(IrqRequest(IrqIndex.INTX, F.ACTION_MASK | F.DATA_NONE, 0, 1))


def test_eventfd_swaps_installs_deassigns_and_disable_all_are_counted(
    live: MsixController, lines: Lines, counters: Counters
) -> None:
    assert counters.get("qemu.eventfd_install") == 3  # the fixture installed 0, 1, 2
    req = lines.install(live, 1)  # a second fd for vector 1: QEMU's unmask/mask signal
    assert req.replaced == 1
    assert counters.get("qemu.eventfd_swap") == 1
    assert counters.access_count("msix-irqs", "eventfd-swap", "fast") == 1
    deassign = IrqRequest(IrqIndex.MSIX, F.ACTION_TRIGGER | F.DATA_EVENTFD, 0, 1)
    live.set_irqs(apply_irq_eventfds(lines.irqs, deassign))
    assert counters.get("qemu.eventfd_deassign") == 1
    disable = IrqRequest(IrqIndex.MSIX, F.ACTION_TRIGGER | F.DATA_NONE, 0, 0)
    live.set_irqs(apply_irq_eventfds(lines.irqs, disable))
    assert counters.get("qemu.disable_all") == 1
    assert counters.get("qemu.eventfd_swap") == 1
    unmask(live, 2)
    assert live.trigger(2) is False  # disable-all released every fd
    assert live.pending(2)


def test_trigger_out_of_range_is_a_programming_error(ctrl: MsixController) -> None:
    with pytest.raises(ValueError):
        ctrl.trigger(3)
    with pytest.raises(ValueError):
        ctrl.trigger(-1)


def test_reset_returns_to_power_on(live: MsixController, lines: Lines) -> None:
    w64(live, 0, ADDR | 0x20)
    unmask(live, 0)
    live.set_irqs(irq(F.ACTION_MASK | F.DATA_NONE, 1, 1))
    live.trigger(1)
    live.reset()
    assert live.entry(0) == (0, 0, 0, 1)
    assert pba(live) == 0
    assert not live.enabled and not live.function_masked
    assert not live.client_masked(1)
    live.control_changed(enabled=True, function_masked=False)
    assert live.trigger(0) is False  # masked again after reset
    assert lines.fired(0) == 0


# -- bad accesses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 16),
        (2, 4),  # misaligned DWORD
        (4, 8),  # QWORD straddling two DWORD pairs
        (12, 8),  # QWORD straddling two entries
        (0x30, 4),  # beyond 3 entries
        (0x2C, 8),  # last QWORD would end past the table
        (-4, 4),
    ],
)
def test_bad_table_accesses_are_einval(ctrl: MsixController, offset: int, size: int) -> None:
    with pytest.raises(AccessError) as e:
        ctrl.table_read(offset, size)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(AccessError) as e:
        ctrl.table_write(offset, b"\xff" * size)
    assert e.value.errno == errno.EINVAL
    assert [ctrl.entry(v) for v in range(3)] == [(0, 0, 0, 1)] * 3  # nothing half-applied


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (2, 4), (4, 8), (8, 4), (8, 8)])
def test_bad_pba_accesses_are_einval(ctrl: MsixController, offset: int, size: int) -> None:
    with pytest.raises(AccessError) as e:
        ctrl.pba_read(offset, size)
    assert e.value.errno == errno.EINVAL


def test_pba_is_read_only_writes_ignored_and_counted(
    live: MsixController, counters: Counters
) -> None:
    live.trigger(0)
    live.pba_write(0, b"\x00" * 8)
    live.pba_write(0, b"\xff" * 4)
    assert pba(live) == 0b001
    assert counters.get("msix.pba_write_ignored") == 2
    with pytest.raises(AccessError):
        live.pba_write(1, b"\x00" * 4)


# -- BAR routing -----------------------------------------------------------------


def test_bar_routing_with_igbvf_geometry(live: MsixController) -> None:
    assert live.handles(3, 0) and live.handles(3, 0x2C) and live.handles(3, 0x2000)
    assert not live.handles(3, 0x30) and not live.handles(3, 0x2008)
    assert not live.handles(0, 0) and not live.handles(3, 0x1000)
    live.write(3, 0x10, (ADDR | 0x40).to_bytes(4, "little"))
    assert live.read(3, 0x10, 4) == (ADDR | 0x40).to_bytes(4, "little")
    live.trigger(2)
    assert live.read(3, 0x2000, 8) == (0b100).to_bytes(8, "little")
    with pytest.raises(AccessError):
        live.read(3, 0x1000, 4)


def test_geometry_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        MsixGeometry(0, 3, 0, 3, 0x2000)
    with pytest.raises(ValueError):
        MsixGeometry(3, 3, 0, 3, 0x20)  # PBA inside the table
    assert IGBVF_GEOMETRY.table_size == 48 and IGBVF_GEOMETRY.pba_size == 8
    assert MsixGeometry(65, 0, 0, 1, 0).pba_size == 16


def test_pba_beyond_64_vectors() -> None:
    ctrl = MsixController(MsixGeometry(70, 0, 0, 1, 0), PathPolicy.SHADOW)
    ctrl.trigger(65)
    assert int.from_bytes(ctrl.pba_read(8, 8), "little") == 0b10
    assert int.from_bytes(ctrl.pba_read(0, 8), "little") == 0
    assert int.from_bytes(ctrl.pba_read(8, 4), "little") == 0b10


def test_counters_snapshot_is_json_and_counts_fast_reads(
    live: MsixController, counters: Counters
) -> None:
    r32(live, 0)
    r32(live, CONTROL)
    r64(live, 0)
    mask(live, 0)
    live.trigger(0)
    snap = json.loads(json.dumps(counters.snapshot()))
    seen = {(a["region"], a["kind"], a["path"]): a["count"] for a in snap["accesses"]}
    assert seen[("msix-table", "read-addr-data", "fast")] == 1
    assert seen[("msix-table", "read-control", "fast")] == 1
    assert seen[("msix-table", "read-qword", "fast")] == 1
    assert seen[("msix-table", "write-control", "fast")] == 3 + 1  # fixture masks + ours
    assert seen[("msix-vector", "pended", "fast")] == 1
    assert "cpu.io_process_seconds" in snap["gauges"]


# -- a client that never touches the table (stock QEMU emulates it) -----------


def test_table_mask_bits_do_not_gate_a_client_that_never_writes_the_table(
    ctrl: MsixController, lines: Lines
) -> None:
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 0, 1, 2)
    ctrl.control_changed(enabled=True, function_masked=False)
    assert ctrl.masked(1)  # power-on value, never cleared by QEMU
    assert not ctrl.table_forwarded
    assert ctrl.trigger(1) is True
    assert lines.fired(1) == 1
    assert not ctrl.pending(1)


def test_function_mask_still_gates_a_client_that_never_writes_the_table(
    ctrl: MsixController, lines: Lines
) -> None:
    ctrl.attach(lines.irqs)
    lines.install(ctrl, 0, 1, 2)
    ctrl.control_changed(enabled=True, function_masked=True)
    assert ctrl.trigger(2) is False
    assert ctrl.pending(2)
    ctrl.control_changed(enabled=True, function_masked=False)
    assert lines.fired(2) == 1
    assert not ctrl.pending(2)


def test_table_ownership_is_per_client(live: MsixController, lines: Lines) -> None:
    assert live.table_forwarded
    assert live.trigger(0) is False  # masked by the table-writing client
    live.detach()
    live.attach(lines.irqs)  # a new client (e.g. QEMU) that emulates the table itself
    assert not live.table_forwarded
    assert lines.fired(0) == 1  # the pending vector is now deliverable: delivered once
    assert not live.pending(0)


def test_qword_write_that_unmasks_delivers_the_pending_vector(
    live: MsixController, lines: Lines
) -> None:
    assert live.trigger(1) is False  # masked by the table-writing client: pending
    w64(live, 16 + 8, 0x42)  # data 0x42 and vector control 0 in one QWORD
    assert lines.fired(1) == 1
    assert not live.pending(1)
    assert live.entry(1)[2] == 0x42

"""The MSI-X fast path of one function: table shadow, masks, PBA, delivery.

One ``MsixController`` per PCI function, run inline in the I/O loop. It owns:

* the shadow table (``shadow.py``): address/data/control per entry;
* the mask state from every source: the table's mask bits, the client's
  SET_IRQS ACTION_MASK/UNMASK ("client mask", ORed in), MSI-X Enable and
  Function Mask from Message Control (``control_changed``), and the shadow's
  dirty bits (an entry whose new address/data the slow path has not taken);
* the Pending Bit Array, and delivery: ``trigger(n)`` writes vector n's
  eventfd through ``IrqLines.signal_msix`` if n can be delivered, otherwise
  sets its pending bit; whenever something unmasks (or an eventfd arrives),
  every pending vector that can now be delivered is delivered once and its
  bit cleared.

Which accesses also need the slow path is the policy's table (``policy.py``);
the controller looks each kind's path and counter up once, at construction.
The slow path never answers on its own authority for state the fast path
owns: forwarded reads carry the fast path's Vector Control and PBA values in
the request (see ``ioreq.py``).

Device-facing offsets: ``read``/``write``/``handles`` take BAR offsets and
route; ``table_*`` take offsets from the table start, ``pba_*`` from the PBA
start.

Stock QEMU never sends table accesses (it emulates the table); from it this
controller sees PBA reads, Message Control changes and SET_IRQS fd swaps only.
So the table's mask bits gate delivery only once the connected client has
written the table ("the client forwards the table", as the replay client and a
pre-2010 Xen device model do). Until then the bits are the power-on "masked"
that nobody will ever clear, and QEMU applies the guest's per-vector mask
itself (it swaps eventfds under KVM; under TCG its MSI-X core latches the
interrupt). Enable, function mask, client masks and missing eventfds always
gate: those QEMU does tell the server.
"""

from __future__ import annotations

import contextlib
import errno
import time
from array import array
from collections.abc import Iterator

from vmsi_server.msix.ioreq import IRQ_FDS_PRESENT, IRQ_SELECTED_SHIFT, Op
from vmsi_server.msix.layout import (
    DWORDS_PER_ENTRY,
    ENTRY_SIZE,
    VECTOR_CONTROL_MASKBIT,
    VECTOR_CONTROL_WRITABLE,
    EntryField,
    MsixGeometry,
)
from vmsi_server.msix.pending import PendingBits
from vmsi_server.msix.policy import AccessKind, Path, PathPolicy
from vmsi_server.msix.shadow import Shadow
from vmsi_server.msix.slowpath import SlowPath, SlowPathError
from vmsi_server.pci.function import AccessError, IrqRequest
from vmsi_server.pci.irq_lines import IrqLines
from vmsi_server.pci.windows import MaskWindow, ReadWindow, WindowMode
from vmsi_server.protocol.constants import IrqIndex, SetIrqsFlags
from vmsi_server.telemetry.counters import AccessStat, Counters

_CONTROL = EntryField.VECTOR_CONTROL.value
_DATA = EntryField.DATA.value
_SELECT_CHUNK = 64 - IRQ_SELECTED_SHIFT
GATE_DELIVERED = 0
"""``MsixController.gate`` slot: messages compiled code delivered (``VL_GATE_DELIVERED``)."""
GATE_FD = 1
"""``MsixController.gate`` slot of vector 0's eventfd (``VL_GATE_FD``)."""
K = AccessKind


def check_access(what: str, offset: int, size: int, limit: int) -> None:
    """Aligned DWORD/QWORD inside ``limit`` bytes, or AccessError(EINVAL)."""
    if size != 4 and size != 8:
        raise AccessError(errno.EINVAL, f"{what}: {size}-byte access (4 or 8 only)")
    if offset % size:
        raise AccessError(errno.EINVAL, f"{what}: {size}-byte access at {offset:#x} misaligned")
    if offset < 0 or offset + size > limit:
        raise AccessError(errno.EINVAL, f"{what}: access {offset:#x}+{size} beyond {limit:#x}")


class MsixController:
    def __init__(
        self,
        geometry: MsixGeometry,
        policy: PathPolicy = PathPolicy.SHADOW,
        slow_path: SlowPath | None = None,
        function_id: int = 0,
        counters: Counters | None = None,
    ) -> None:
        self.geometry = geometry
        self.policy = policy
        self.function_id = function_id
        self.counters = counters if counters is not None else Counters(process_cpu=False)
        self._slow = slow_path
        self._vectors = geometry.vectors
        self._table_size = geometry.table_size
        self._pba_size = geometry.pba_size
        self._shadow = Shadow(geometry.vectors)
        self._dwords = self._shadow.table.dwords  # same list object for the table's life
        self._pending = PendingBits(geometry.vectors)
        self._client_masked = 0
        self._enabled = False
        self._function_masked = False
        self._irqs: IrqLines | None = None
        self._forwarded = array("I", [0])
        """1 while the client forwards the table (see ``table_forwarded``); an array so
        the compiled lane's mask window reads the same word (it arms the window)."""
        self.gate = array("q", [0] + [-1] * geometry.vectors)
        """What compiled code may deliver without asking: slot GATE_FD + n holds vector
        n's eventfd while nothing but the table's own mask bit (which C reads live,
        see ``table_forwarded``) could stop it, else -1; slot GATE_DELIVERED counts the
        messages C sent. Republished after every change of what gates delivery."""
        self._gate_seen = 0
        self._time_fast = self.counters.time_fast_path
        # Without a slow path every decision is "fast": there is no device model.
        self._routes: dict[AccessKind, tuple[Path, AccessStat]] = {}
        for kind in AccessKind:
            path = policy.path(kind) if slow_path is not None else Path.FAST
            self._routes[kind] = (path, self.counters.access(kind.region, kind.kind, path.value))
        c = self.counters
        self._delivered = c.access("msix-vector", "delivered", "fast")
        self._pended = c.access("msix-vector", "pended", "fast")
        self._redelivered = c.access("msix-vector", "redelivered", "fast")
        c.add_collector(self._collect_gate)
        if slow_path is not None:
            slow_path.register(function_id, geometry.vectors, self)

    # -- wiring -------------------------------------------------------
    def attach(self, irqs: IrqLines) -> None:
        """A client connected: its eventfds are where vectors go from now on."""
        self._irqs = irqs
        self._forwarded[0] = 0
        irqs.add_listener(self._publish_gate)
        self._redeliver()
        self._publish_gate()

    def detach(self) -> None:
        """The client went: triggers only set pending bits until the next attach."""
        if self._irqs is not None:
            self._irqs.remove_listener(self._publish_gate)
        self._irqs = None
        self._forwarded[0] = 0
        self._publish_gate()

    def _publish_gate(self) -> None:
        """Recompute ``gate`` from the enable/function mask, client masks, dirty
        entries and eventfds (``_can_fire`` without the table's mask bit)."""
        gate, irqs = self.gate, self._irqs
        held = self._client_masked | self._shadow.dirty
        for v in range(self._vectors):
            fd = None
            if (irqs is not None and self._enabled and not self._function_masked
                    and not held >> v & 1):
                fd = irqs.fd(IrqIndex.MSIX, v)
            gate[GATE_FD + v] = -1 if fd is None else fd

    def _collect_gate(self) -> None:
        """Fold the messages compiled code delivered into ``delivered``."""
        sent = self.gate[GATE_DELIVERED]
        if sent != self._gate_seen:
            self._delivered.count += sent - self._gate_seen
            self._gate_seen = sent

    @property
    def forwarded_word(self) -> array[int]:
        """The one-word buffer behind ``table_forwarded`` (for compiled readers)."""
        return self._forwarded

    @property
    def table_dwords(self) -> array[int]:
        """The shadow table's dwords, in place (for compiled readers)."""
        return self._dwords

    @property
    def table_forwarded(self) -> bool:
        """Whether this client writes the table (so its mask bits are authoritative)."""
        return bool(self._forwarded[0])

    def close(self) -> None:
        """Forget the function in the slow path (the device is going away)."""
        if self._slow is not None:
            self._slow.unregister(self.function_id)

    def handles(self, region: int, offset: int) -> bool:
        """Whether a BAR access at ``offset`` falls in the table or the PBA."""
        return self.geometry.in_table(region, offset) or self.geometry.in_pba(region, offset)

    def read(self, region: int, offset: int, size: int) -> bytes:
        """Route a BAR read that ``handles`` accepted."""
        g = self.geometry
        if g.in_table(region, offset):
            return self.table_read(offset - g.table_offset, size)
        if g.in_pba(region, offset):
            return self.pba_read(offset - g.pba_offset, size)
        raise AccessError(errno.EINVAL, f"BAR{region}+{offset:#x} is not MSI-X table or PBA")

    def write(self, region: int, offset: int, data: bytes | memoryview) -> None:
        g = self.geometry
        if g.in_table(region, offset):
            self.table_write(offset - g.table_offset, data)
        elif g.in_pba(region, offset):
            self.pba_write(offset - g.pba_offset, data)
        else:
            raise AccessError(errno.EINVAL, f"BAR{region}+{offset:#x} is not MSI-X table or PBA")

    def read_windows(self) -> list[ReadWindow]:
        """The table and PBA as read windows, when their reads never leave the fast
        path (``shadow``, or no slow path): then a read is the shadow's bytes and a
        count in the same stats ``table_read``/``pba_read`` keep."""
        g = self.geometry
        timed = self._time_fast
        out: list[ReadWindow] = []
        table_kinds = (K.TABLE_READ_QWORD, K.TABLE_READ_CONTROL, K.TABLE_READ_ADDR_DATA)
        if all(self._routes[kind][0] is Path.FAST for kind in table_kinds):
            out.append(ReadWindow(g.table_bar, g.table_offset, self._dwords,
                                  WindowMode.MSIX_TABLE,
                                  tuple(self._routes[kind][1] for kind in table_kinds), timed))
        if self._routes[K.PBA_READ][0] is Path.FAST:
            out.append(ReadWindow(g.pba_bar, g.pba_offset, self._pending.image,
                                  WindowMode.MSIX_PBA, (self._routes[K.PBA_READ][1],), timed))
        return out

    def mask_windows(self) -> list[MaskWindow]:
        """The table's Vector Control writes, when they stay on the fast path (shadow,
        legacy): the lane then applies a mask, or an unmask with nothing pending, in
        place, exactly as ``table_write`` would; it is armed while the client forwards
        the table (see ``table_forwarded``)."""
        path, stat = self._routes[K.TABLE_WRITE_CONTROL]
        if path is not Path.FAST:
            return []
        g = self.geometry
        return [MaskWindow(g.table_bar, g.table_offset, self._dwords, self._pending.image,
                           self._forwarded, VECTOR_CONTROL_WRITABLE, stat, self._time_fast)]

    # -- state, for the device and tests ------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def pending(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._pending.test(vector)

    def masked(self, vector: int) -> bool:
        """The table's mask bit (the guest's view)."""
        self._check_vector(vector)
        return bool(self._dwords[vector * DWORDS_PER_ENTRY + _CONTROL] & VECTOR_CONTROL_MASKBIT)

    def client_masked(self, vector: int) -> bool:
        self._check_vector(vector)
        return bool(self._client_masked >> vector & 1)

    def dirty(self, vector: int) -> bool:
        self._check_vector(vector)
        return self._shadow.is_dirty(vector)

    def entry(self, vector: int) -> tuple[int, int, int, int]:
        """The shadow's (address lo, address hi, data, control) of ``vector``."""
        self._check_vector(vector)
        return self._shadow.table.entry(vector)

    def deliverable(self, vector: int) -> bool:
        """Would ``trigger(vector)`` write an eventfd now?"""
        self._check_vector(vector)
        irqs = self._irqs
        return (
            irqs is not None
            and self._can_fire(vector)
            and irqs.fd(IrqIndex.MSIX, vector) is not None
        )

    # -- table ----------------------------------------------------------
    def table_read(self, offset: int, size: int) -> bytes:
        check_access("MSI-X table", offset, size, self._table_size)
        index = offset >> 2
        if size == 8:
            kind = K.TABLE_READ_QWORD
        elif index & 3 == _CONTROL:
            kind = K.TABLE_READ_CONTROL
        else:
            kind = K.TABLE_READ_ADDR_DATA
        path, stat = self._routes[kind]
        if path is Path.FAST:
            if self._time_fast:
                t0 = time.perf_counter_ns()
                value = self._shadow.table.read(offset, size)
                stat.record(time.perf_counter_ns() - t0)
            else:
                value = self._shadow.table.read(offset, size)
                stat.count += 1
            return value.to_bytes(size, "little")
        control = self._dwords[(index & ~3) | _CONTROL]
        value = self._forward(stat, Op.TABLE_READ, offset, size, control)
        return value.to_bytes(size, "little")

    def table_write(self, offset: int, data: bytes | memoryview) -> None:
        size = len(data)
        check_access("MSI-X table", offset, size, self._table_size)
        self._forwarded[0] = 1
        value = int.from_bytes(data, "little")
        index = offset >> 2
        vector = offset // ENTRY_SIZE
        if size == 4 and index & 3 == _CONTROL:
            path, stat = self._routes[K.TABLE_WRITE_CONTROL]
            t0 = time.perf_counter_ns() if (self._time_fast or path is not Path.FAST) else 0
            self._shadow.table.write_dword(index, value)
            try:
                if path is not Path.FAST:  # forward-all: the device model hears of it
                    self._call(stat, Op.TABLE_WRITE, offset, 4, value)
            finally:
                if value & VECTOR_CONTROL_MASKBIT == 0:
                    self._redeliver_one(vector)
            self._finish(stat, t0)
            return
        path, stat = self._routes[K.TABLE_WRITE_ADDR_DATA]
        t0 = time.perf_counter_ns() if (self._time_fast or path is not Path.FAST) else 0
        if path is Path.FAST:  # no device model: the shadow is the only copy
            self._shadow.table.write(offset, size, value)
            if size == 8 and index & 3 == _DATA and not (value >> 32) & VECTOR_CONTROL_MASKBIT:
                self._redeliver_one(vector)  # data + control: the QWORD unmasked it
        else:
            self._shadow.write_dirty(offset, size, value)
            if size == 8 and index & 3 == _DATA and self.policy is not PathPolicy.FORWARD_ALL:
                # Data + control in one QWORD: only the data DWORD is written
                # through; control stays with the fast path (shadow/legacy).
                send_size, send_value = 4, value & 0xFFFFFFFF
            else:
                send_size, send_value = size, value
            # On SlowPathError: a successful restart replayed the shadow (new
            # value included) and ran replayed(); otherwise the entry stays
            # dirty, its vector held, until a later replay acknowledges it.
            try:
                self._call(stat, Op.TABLE_WRITE, offset, send_size, send_value)
                self._write_through_done(vector)
            finally:
                self._publish_gate()  # dirty until acknowledged
        self._finish(stat, t0)

    # -- PBA ----------------------------------------------------------
    def pba_read(self, offset: int, size: int) -> bytes:
        check_access("MSI-X PBA", offset, size, self._pba_size)
        path, stat = self._routes[K.PBA_READ]
        if path is Path.FAST:
            if self._time_fast:
                t0 = time.perf_counter_ns()
                value = self._pending.read(offset, size)
                stat.record(time.perf_counter_ns() - t0)
            else:
                value = self._pending.read(offset, size)
                stat.count += 1
        else:
            qword = self._pending.read(offset & ~7, 8)
            value = self._forward(stat, Op.PBA_READ, offset, size, qword)
        return value.to_bytes(size, "little")

    def pba_write(self, offset: int, data: bytes | memoryview) -> None:
        """The PBA is read-only: a well-formed write is counted and dropped."""
        size = len(data)
        check_access("MSI-X PBA", offset, size, self._pba_size)
        self.counters.incr("msix.pba_write_ignored")
        path, stat = self._routes[K.PBA_WRITE]
        if path is Path.FAST:
            stat.count += 1
        else:
            self._forward(stat, Op.PBA_WRITE, offset, size, int.from_bytes(data, "little"))

    # -- Message Control ----------------------------------------------
    def control_changed(self, enabled: bool, function_masked: bool) -> None:
        """MSI-X Enable / Function Mask as config space now holds them.

        Idempotent: a device may call it for every Message Control write (so
        forward-all charges unchanged writes too) or only on change.
        """
        path, stat = self._routes[K.CONTROL_CHANGED]
        t0 = time.perf_counter_ns() if (self._time_fast or path is not Path.FAST) else 0
        self._enabled = enabled
        self._function_masked = function_masked
        try:
            if path is not Path.FAST:
                self._call(stat, Op.CONTROL_CHANGED, 0, 0, int(enabled) | int(function_masked) << 1)
        finally:
            self._publish_gate()
            self._redeliver()
        self._finish(stat, t0)

    # -- SET_IRQS -----------------------------------------------------
    def set_irqs(self, request: IrqRequest) -> None:
        """A SET_IRQS for index 2, after the session applied its eventfds."""
        if request.index != IrqIndex.MSIX:
            raise ValueError(f"IRQ index {request.index} is not MSI-X")
        if request.start < 0 or request.count < 0 or request.start + request.count > self._vectors:
            raise AccessError(
                errno.EINVAL,
                f"MSI-X vectors {request.start}+{request.count} beyond {self._vectors}",
            )
        action, data = request.action, request.data
        selected = request.selected()
        bits = 0
        for v in selected:
            bits |= 1 << v
        fire: list[int] = []
        if action == SetIrqsFlags.ACTION_MASK:
            kind = K.IRQ_MASK
            self._client_masked |= bits
        elif action == SetIrqsFlags.ACTION_UNMASK:
            kind = K.IRQ_UNMASK
            self._client_masked &= ~bits
        elif action == SetIrqsFlags.ACTION_TRIGGER:
            if request.count == 0:
                kind = K.IRQ_DISABLE_ALL
                self.counters.incr("qemu.disable_all")
            elif data == SetIrqsFlags.DATA_EVENTFD:
                if not request.fds:
                    kind = K.IRQ_EVENTFD_DEASSIGN
                    self.counters.incr("qemu.eventfd_deassign")
                    self.counters.incr("qemu.eventfd_deassigned_vectors", request.count)
                elif request.replaced:
                    kind = K.IRQ_EVENTFD_SWAP
                    self.counters.incr("qemu.eventfd_swap")
                    self.counters.incr("qemu.eventfd_swapped_vectors", request.replaced)
                else:
                    kind = K.IRQ_EVENTFD_INSTALL
                    self.counters.incr("qemu.eventfd_install")
                    self.counters.incr("qemu.eventfd_installed_vectors", request.count)
            else:
                kind = K.IRQ_TRIGGER
                fire = selected
        else:
            raise AccessError(errno.EINVAL, f"SET_IRQS action {action!r}")
        path, stat = self._routes[kind]
        t0 = time.perf_counter_ns() if (self._time_fast or path is not Path.FAST) else 0
        try:
            if path is not Path.FAST:
                update = int(request.flags) & 0xFF
                if request.fds:
                    update |= IRQ_FDS_PRESENT
                update |= (bits >> request.start) << IRQ_SELECTED_SHIFT
                self._call(stat, Op.IRQ_UPDATE, request.start, request.count, update)
        finally:
            self._publish_gate()
            for v in fire:
                self.trigger(v)
            self._redeliver()
        self._finish(stat, t0)

    # -- device side ----------------------------------------------------
    def trigger(self, vector: int) -> bool:
        """The device raises ``vector``: deliver it or set its pending bit.

        Returns True when an eventfd was written.
        """
        if not 0 <= vector < self._vectors:
            raise ValueError(f"MSI-X vector {vector} outside 0..{self._vectors - 1}")
        irqs = self._irqs
        if irqs is not None and self._can_fire(vector) and irqs.signal_msix(vector):
            self._delivered.count += 1
            return True
        self._pending.set(vector)
        self._pended.count += 1
        return False

    def reset(self) -> None:
        """Power-on state: all entries masked, address/data 0, PBA clear, disabled."""
        self._shadow.reset()
        self._pending.reset()
        self._client_masked = 0
        self._enabled = False
        self._function_masked = False
        self._publish_gate()
        self.counters.incr("msix.reset")
        if self._slow is not None:
            # On failure a restarted worker got the (reset) shadow by replay;
            # a dead one gets it when it comes back. Counted by the slow path.
            with contextlib.suppress(SlowPathError):
                self._slow.call(Op.RESET, self.function_id)

    # -- ReplaySource (for SlowPath restarts) -----------------------------
    def replay_records(self) -> Iterator[tuple[Op, int, int, int]]:
        d = self._dwords
        for vector in range(self._vectors):
            base = vector * DWORDS_PER_ENTRY
            yield Op.TABLE_WRITE, base * 4, 8, d[base] | d[base + 1] << 32
            yield Op.TABLE_WRITE, base * 4 + 8, 8, d[base + 2] | d[base + 3] << 32
        yield Op.CONTROL_CHANGED, 0, 0, int(self._enabled) | int(self._function_masked) << 1
        irqs = self._irqs
        assigned = 0
        if irqs is not None:
            for v in irqs.assigned(IrqIndex.MSIX):
                if v < self._vectors:
                    assigned |= 1 << v
        trigger_fd = int(SetIrqsFlags.ACTION_TRIGGER | SetIrqsFlags.DATA_EVENTFD)
        mask = int(SetIrqsFlags.ACTION_MASK | SetIrqsFlags.DATA_BOOL)
        for start in range(0, self._vectors, _SELECT_CHUNK):
            count = min(_SELECT_CHUNK, self._vectors - start)
            chunk = (1 << count) - 1
            fds = (assigned >> start) & chunk
            masks = (self._client_masked >> start) & chunk
            yield Op.IRQ_UPDATE, start, count, trigger_fd | (chunk << IRQ_SELECTED_SHIFT)
            yield (
                Op.IRQ_UPDATE,
                start,
                count,
                trigger_fd | IRQ_FDS_PRESENT | (fds << IRQ_SELECTED_SHIFT),
            )
            yield Op.IRQ_UPDATE, start, count, mask | (masks << IRQ_SELECTED_SHIFT)

    def replayed(self) -> None:
        """Completion hook for everything in flight: the new worker has the shadow."""
        self._shadow.acknowledge_all()
        self._publish_gate()
        self._redeliver()

    # -- internals ------------------------------------------------------
    def _can_fire(self, vector: int) -> bool:
        return (
            self._enabled
            and not self._function_masked
            and not (
                self._forwarded[0]
                and self._dwords[vector * DWORDS_PER_ENTRY + _CONTROL] & VECTOR_CONTROL_MASKBIT
            )
            and not ((self._client_masked | self._shadow.dirty) >> vector & 1)
        )

    def _redeliver_one(self, vector: int) -> None:
        if self._pending.test(vector):
            irqs = self._irqs
            if irqs is not None and self._can_fire(vector) and irqs.signal_msix(vector):
                self._pending.clear(vector)
                self._redelivered.count += 1

    def _redeliver(self) -> None:
        if self._pending.bits and self._irqs is not None:
            for vector in self._pending.vectors_set():
                self._redeliver_one(vector)

    def _write_through_done(self, vector: int) -> None:
        """Completion hook of one write-through: the slow path has the new message."""
        self._shadow.acknowledge(vector)
        self._redeliver_one(vector)

    def _forward(self, stat: AccessStat, op: Op, offset: int, size: int, data: int) -> int:
        """A forwarded access whose answer is the slow path's."""
        assert self._slow is not None
        t0 = time.perf_counter_ns()
        try:
            value = self._slow.call(op, self.function_id, offset, size, data)
        except SlowPathError:
            stat.errors += 1
            raise
        stat.record(time.perf_counter_ns() - t0)
        return value

    def _call(self, stat: AccessStat, op: Op, offset: int, size: int, data: int) -> None:
        """A write-through round trip (timed by the caller, via _finish)."""
        assert self._slow is not None
        try:
            self._slow.call(op, self.function_id, offset, size, data)
        except SlowPathError:
            stat.errors += 1
            raise

    def _finish(self, stat: AccessStat, t0: int) -> None:
        if t0:
            stat.record(time.perf_counter_ns() - t0)
        else:
            stat.count += 1

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self._vectors:
            raise ValueError(f"MSI-X vector {vector} outside 0..{self._vectors - 1}")

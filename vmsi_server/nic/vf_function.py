"""The 82576 VF as a PCI function: config space, BAR0 registers, BAR3 MSI-X.

This is where the layers meet. Config writes go to the config-space model and
its events fan out (MSI-X enable and function mask to the MSI-X controller,
FLR to a reset, bus-master off to a DMA stop). BAR0 goes to ``VfCore``; BAR3 to
the MSI-X controller, whose ``trigger`` is what ``VfCore`` calls to send an
interrupt, so masking and pending bits apply to every interrupt the NIC
raises. The tap fd is watched on the loop only while a client is attached and
the RX ring has room, so a full ring costs no busy loop.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

import structlog

from vmsi_server import fastlane
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.fastlane.guestmap import GuestMap
from vmsi_server.fastlane.rxpath import TapRx
from vmsi_server.fastlane.txpath import TapTx
from vmsi_server.fastlane.vfpath import VfPath
from vmsi_server.msix.controller import MsixController
from vmsi_server.msix.layout import MsixGeometry
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.msix.slowpath import SlowPath
from vmsi_server.nic import registers as r
from vmsi_server.nic.backend.base import PacketBackend
from vmsi_server.nic.backend.loop import LoopBackend
from vmsi_server.nic.backend.tap import TapBackend
from vmsi_server.nic.pf import Pf, VfPort
from vmsi_server.nic.rx import RxQueue
from vmsi_server.nic.stats import VfStats
from vmsi_server.nic.tx import TxQueue
from vmsi_server.nic.vf_core import VfCore
from vmsi_server.pci.config_space import (
    CommandChanged,
    FunctionLevelReset,
    MsixControlChanged,
)
from vmsi_server.pci.function import (
    AccessError,
    FunctionHost,
    IrqRequest,
    IrqSpec,
    PciFunction,
    RegionSpec,
)
from vmsi_server.pci.igbvf_layout import (
    IGBVF_BAR_SIZE,
    IGBVF_LAYOUT,
    IGBVF_MSIX_BAR,
    IGBVF_MSIX_OFFSET,
    IGBVF_MSIX_PBA_OFFSET,
    IGBVF_MSIX_TABLE_OFFSET,
    IGBVF_MSIX_VECTORS,
    IGBVF_REGISTER_BAR,
)
from vmsi_server.pci.windows import MaskWindow, ReadWindow, RegisterRule
from vmsi_server.protocol.constants import IrqIndex, IrqInfoFlags, RegionIndex, RegionInfoFlags
from vmsi_server.telemetry.counters import Counters
from vmsi_server.transport.loop import EventLoop

log = structlog.get_logger("vmsi.vf")

RX_BATCH = 64
"""Frames taken from the backend per readiness wakeup (like one NAPI budget)."""

REGISTER_BAR = IGBVF_REGISTER_BAR
MSIX_BAR = IGBVF_MSIX_BAR
BAR_SIZE = IGBVF_BAR_SIZE
CONFIG_SIZE = 4096
MSIX_CAP_LENGTH = 12
RW = RegionInfoFlags.READ | RegionInfoFlags.WRITE

GEOMETRY = MsixGeometry(
    vectors=IGBVF_MSIX_VECTORS,
    table_bar=MSIX_BAR,
    table_offset=IGBVF_MSIX_TABLE_OFFSET,
    pba_bar=MSIX_BAR,
    pba_offset=IGBVF_MSIX_PBA_OFFSET,
)

REGIONS: tuple[RegionSpec, ...] = (
    RegionSpec(RegionIndex.BAR0, BAR_SIZE, RW),  # register file, traps (no mmap)
    RegionSpec(RegionIndex.BAR1),  # upper half of 64-bit BAR0
    RegionSpec(RegionIndex.BAR2),
    RegionSpec(RegionIndex.BAR3, BAR_SIZE, RW),  # MSI-X table and PBA
    RegionSpec(RegionIndex.BAR4),  # upper half of 64-bit BAR3
    RegionSpec(RegionIndex.BAR5),
    RegionSpec(RegionIndex.ROM),
    RegionSpec(RegionIndex.CONFIG, CONFIG_SIZE, RW),
    RegionSpec(RegionIndex.VGA),
)

IRQS: tuple[IrqSpec, ...] = (
    IrqSpec(IrqIndex.INTX, 0),  # a VF has no INTx (Interrupt Pin 0)
    IrqSpec(IrqIndex.MSI, 0),
    # MASKABLE: the server implements MSI-X mask/unmask actions (stock QEMU
    # never sends them, but the replay client does). Never NORESIZE: QEMU would
    # then tear down all vectors whenever the set grows.
    IrqSpec(IrqIndex.MSIX, IGBVF_MSIX_VECTORS, IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE),
    IrqSpec(IrqIndex.ERR, 1),
    IrqSpec(IrqIndex.REQ, 1),
)


def _tap_queues(backend: PacketBackend, port: VfPort) -> tuple[TapRx | None, TapTx | None]:
    """The compiled RX loop and TX walk, for a tap when the fast lane is built."""
    if not fastlane.available() or not isinstance(backend, TapBackend):
        return None, None
    fd = backend.fileno()
    if fd is None:
        return None, None
    memory_map = GuestMap()
    return TapRx(fd, port.accepts, memory_map=memory_map), TapTx(fd, memory_map)


class Igb82576Vf(PciFunction):
    """One VF of the emulated 82576 PF."""

    def __init__(
        self,
        pf: Pf,
        vf_index: int,
        loop: EventLoop,
        backend: PacketBackend | None = None,
        policy: PathPolicy = PathPolicy.SHADOW,
        slow_path: SlowPath | None = None,
        counters: Counters | None = None,
        compiled: bool | None = None,
    ) -> None:
        """``compiled``: use the fast lane's packet loops and RX checksum check (None:
        when the module is built; False: the pure Python queues)."""
        super().__init__()
        self.name = f"vf{vf_index}"
        self.vf_index = vf_index
        self.pf = pf
        self.loop = loop
        self.counters = counters or Counters()
        self.config = IGBVF_LAYOUT.build()
        self.msix = MsixController(
            GEOMETRY, policy=policy, slow_path=slow_path, function_id=vf_index,
            counters=self.counters,
        )
        self.backend: PacketBackend = backend if backend is not None else LoopBackend(keep=False)
        self.stats = VfStats()
        port = pf.vf(vf_index)
        use_c = fastlane.available() if compiled is None else compiled
        tap_rx, tap_tx = _tap_queues(self.backend, port) if use_c else (None, None)
        self.tx = TxQueue(self._dma_memory, self.backend, self.stats, fast=tap_tx)
        self.rx = RxQueue(self._dma_memory, self.backend, self.stats, accepts=port.accepts,
                          checksum=fastlane.rx_checksum() if use_c else None, fast=tap_rx)
        self.core = VfCore(
            pf, vf_index, self.msix.trigger, loop, self.tx, self.rx, stats=self.stats,
            port_changed=self._port_changed, tx_resumed=self._publish,
        )
        self._bus_master = False
        self._rx_watched = False
        self.path: VfPath | None = None
        """The compiled hot path (``fastlane/vf.c``): doorbells, EIMS/EICS and tap
        wake-ups served in C on this VF's own state. None without the module."""
        if use_c and fastlane.available():
            self.path = VfPath(
                bar=REGISTER_BAR,
                offsets={"tdt": r.TDT0, "rdt": r.RDT0, "eims": r.EIMS, "eics": r.EICS},
                interrupts=self.core.interrupts, msix=self.msix, tx=self.tx, rx=self.rx,
                stats=self.stats, errors=getattr(self.backend, "errors", None),
                on_rx_full=self._rx_ring_full, rx_batch=RX_BATCH)
            self.path.follow(self._publish)

    # -- description --------------------------------------------------
    @property
    def regions(self) -> Sequence[RegionSpec]:
        return REGIONS

    @property
    def irq_specs(self) -> Sequence[IrqSpec]:
        return IRQS

    # -- lifecycle ----------------------------------------------------
    def attach(self, host: FunctionHost) -> None:
        super().attach(host)
        self.msix.attach(host.irqs)
        self._watch_rx(True)
        self._publish()

    def detach(self) -> None:
        self._watch_rx(False)
        self.msix.detach()
        super().detach()
        self._publish()

    def reset(self) -> None:
        """Power-on state for DEVICE_RESET and FLR; in-flight work is dropped."""
        self.core.reset()
        self.msix.reset()
        self.config.reset()
        self._bus_master = False
        self.counters.incr("vf.reset")
        self._publish()

    def close(self) -> None:
        self._watch_rx(False)
        if self.path is not None:
            self.path.stop()
        self.core.close()
        self.msix.close()
        self.backend.close()

    # -- DMA gate -----------------------------------------------------
    def _dma_memory(self) -> GuestMemory | None:
        """Guest memory while the device may master the bus, else None (no DMA)."""
        if not self._bus_master or self._host is None:
            return None
        return self._host.memory

    def _port_changed(self, port: VfPort) -> None:
        """Mailbox answers and resets change what RX accepts (SET_LPE, the MAC, CTS)."""
        self.rx.max_frame = port.max_frame
        self.rx.unicast = port.mac if port.cts else None

    @property
    def hot_path(self) -> Any:
        """The ``struct vl_vf`` a session's lane hands register writes to, or None."""
        return self.path.cdata if self.path is not None else None

    def _publish(self) -> None:
        """Tell the compiled hot path what it may serve now (see ``VfPath.publish``):
        after every change Python makes to rings, enables, DMA or the tap watch."""
        if self.path is not None:
            self.path.publish(self._dma_memory(), self._rx_watched)

    # -- RX readiness -------------------------------------------------
    def _watch_rx(self, on: bool) -> None:
        fd = self.backend.fileno()
        if fd is None or on == self._rx_watched:
            return
        lanes = self.loop.lanes
        if on:
            self.loop.add_reader(fd, self._on_rx_ready)
            if lanes is not None and self.path is not None:
                lanes.add_vf(fd, self.path.cdata)
        else:
            if lanes is not None:
                lanes.remove_vf(fd)
            self.loop.remove_reader(fd)
        self._rx_watched = on
        self._publish()

    def _rx_ring_full(self) -> None:
        """The compiled RX filled the ring: stop watching until the next RDT write."""
        self.stats.rx_ring_full += 1
        self._watch_rx(False)

    def _on_rx_ready(self) -> None:
        self.stats.rx_wakeups += 1
        rx = self.rx
        # The cause goes up with the first frame written back, as on the hardware,
        # not after the whole batch: the guest's NAPI poll can start while the rest
        # is copied (with auto-mask this is still one message per re-arm).
        delivered = rx.poll(1)
        if delivered:
            self.core.rx_delivered(delivered)
            delivered = rx.poll(RX_BATCH - 1)
            if delivered:
                self.core.rx_delivered(delivered)
        if not rx.has_room():
            # Stop watching until the driver gives buffers back (RDT write).
            self._rx_ring_full()

    # -- accesses -----------------------------------------------------
    def read_windows(self) -> Sequence[ReadWindow]:
        """Config space (reads have no side effects here) and, when their reads stay on
        the fast path, the MSI-X table and PBA: what ``read`` returns for them is
        exactly these buffers."""
        return [ReadWindow(RegionIndex.CONFIG, 0, self.config.buffer), *self.msix.read_windows()]

    def mask_windows(self) -> Sequence[MaskWindow]:
        return self.msix.mask_windows()

    def register_rules(self) -> Sequence[RegisterRule]:
        """igbvf's interrupt re-arm (EIMS after each handler) and EIMC."""
        return self.core.interrupts.register_rules(REGISTER_BAR, r.EIMS, r.EIMC)

    @property
    def access_counters(self) -> Counters:
        return self.counters

    def read(self, region: int, offset: int, count: int) -> bytes:
        if region == REGISTER_BAR:
            return self.core.read(offset, count).to_bytes(count, "little")
        if region == MSIX_BAR:
            return self._msix_bar_read(offset, count)
        if region == RegionIndex.CONFIG:
            return self.config.read(offset, count)
        raise AccessError(errno.EINVAL, f"region {region} is not readable")

    def write(self, region: int, offset: int, data: memoryview) -> None:
        if region == REGISTER_BAR:
            count = len(data)
            self.core.write(offset, count, int.from_bytes(data, "little"))
            if offset == r.RDT0 and not self._rx_watched and self._host is not None:
                self._watch_rx(self.rx.has_room())
            self._publish()
            return
        if region == MSIX_BAR:
            self._msix_bar_write(offset, data)
            return
        if region == RegionIndex.CONFIG:
            self._config_write(offset, bytes(data))
            self._publish()
            return
        raise AccessError(errno.EINVAL, f"region {region} is not writable")

    def _msix_bar_read(self, offset: int, count: int) -> bytes:
        if self.msix.handles(MSIX_BAR, offset):
            return self.msix.read(MSIX_BAR, offset, count)
        # The rest of BAR3 is reserved: reads as zero, like unimplemented registers.
        return bytes(count)

    def _msix_bar_write(self, offset: int, data: memoryview) -> None:
        if self.msix.handles(MSIX_BAR, offset):
            self.msix.write(MSIX_BAR, offset, data)
        else:
            self.counters.incr("vf.bar3_reserved_write")

    def _config_write(self, offset: int, data: bytes) -> None:
        events = self.config.write(offset, data)
        touched_msix = (
            offset < IGBVF_MSIX_OFFSET + MSIX_CAP_LENGTH
            and offset + len(data) > IGBVF_MSIX_OFFSET
        )
        for event in events:
            if isinstance(event, CommandChanged):
                self._bus_master = event.bus_master
            elif isinstance(event, FunctionLevelReset):
                log.info("vf.flr", vf=self.vf_index)
                self.reset()
                return
        if touched_msix:
            # Every write into the capability is an MSI-X event (forward-all
            # charges even those that change nothing); the controller decides.
            control = next((e for e in events if isinstance(e, MsixControlChanged)), None)
            enabled, masked = (
                (control.enabled, control.function_masked)
                if control is not None
                else self._msix_control_bits()
            )
            self.msix.control_changed(enabled, masked)

    def _msix_control_bits(self) -> tuple[bool, bool]:
        control = self.config.read_int(IGBVF_MSIX_OFFSET + 2, 2)
        return bool(control & 0x8000), bool(control & 0x4000)

    def set_irqs(self, request: IrqRequest) -> None:
        if request.index == IrqIndex.MSIX:
            self.msix.set_irqs(request)
        else:
            super().set_irqs(request)

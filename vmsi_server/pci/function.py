"""The interface every device served over vfio-user implements.

A session (one client connection) speaks the protocol; a ``PciFunction`` is the
device behind it. The session validates what only the protocol knows (message
shape, region index, bounds against the region size, the transfer limit) and
hands the function typed, in-range accesses. The function raises
``AccessError`` for what only it can judge (an access size its registers do
not take, a write to a read-only region); the session turns that into an
error reply and keeps serving.

The same function object runs on the project's own engine and on libvfio-user
(``bindings/``), so nothing here knows about sockets or messages.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vmsi_server.pci.irq_lines import IrqLines
from vmsi_server.protocol.constants import (
    DeviceInfoFlags,
    IrqIndex,
    IrqInfoFlags,
    RegionInfoFlags,
    SetIrqsFlags,
)

if TYPE_CHECKING:
    from vmsi_server.dma.memory import GuestMemory
    from vmsi_server.pci.windows import MaskWindow, ReadWindow, RegisterRule
    from vmsi_server.telemetry.counters import Counters
    from vmsi_server.transport.loop import EventLoop


class AccessError(Exception):
    """A request the device refuses; ``errno`` goes into the error reply."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


NO_REGION_FLAGS = RegionInfoFlags(0)


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One vfio-user region as DEVICE_GET_REGION_INFO reports it.

    ``size == 0`` marks an absent region (unused BARs, the upper half of a
    64-bit BAR). ``mmap_areas`` are (offset, size) pairs inside the region that
    a client may map; offering any makes QEMU turn posted writes off for the
    whole device, so the NIC offers none.
    """

    index: int
    size: int = 0
    flags: RegionInfoFlags = NO_REGION_FLAGS
    mmap_areas: tuple[tuple[int, int], ...] = ()

    @property
    def present(self) -> bool:
        return self.size > 0


@dataclass(frozen=True, slots=True)
class IrqSpec:
    """One IRQ index as DEVICE_GET_IRQ_INFO reports it."""

    index: int
    count: int = 0
    flags: IrqInfoFlags = IrqInfoFlags.EVENTFD


@dataclass(frozen=True, slots=True)
class IrqRequest:
    """A validated SET_IRQS, in the terms a device cares about.

    ``replaced`` counts vectors whose eventfd was swapped for another (what
    stock QEMU sends instead of MSI-X mask/unmask actions).
    """

    index: int
    flags: SetIrqsFlags
    start: int
    count: int
    fds: tuple[int, ...] = ()
    bools: tuple[bool, ...] | None = None
    replaced: int = 0

    @property
    def action(self) -> SetIrqsFlags:
        return self.flags & SetIrqsFlags.ACTION_MASK_BITS

    @property
    def data(self) -> SetIrqsFlags:
        return self.flags & SetIrqsFlags.DATA_MASK

    def selected(self) -> list[int]:
        """Vectors the request acts on (DATA_BOOL selects by its bytes)."""
        vectors = range(self.start, self.start + self.count)
        if self.bools is None:
            return list(vectors)
        return [v for v, on in zip(vectors, self.bools, strict=True) if on]


class FunctionHost(Protocol):
    """What a function may use of the connection it is served on."""

    @property
    def memory(self) -> GuestMemory: ...

    @property
    def irqs(self) -> IrqLines: ...

    @property
    def loop(self) -> EventLoop: ...


class PciFunction(abc.ABC):
    """A PCI function: regions, IRQ indexes, accesses, reset."""

    name: str = "pci-function"
    device_flags: DeviceInfoFlags = DeviceInfoFlags.PCI | DeviceInfoFlags.RESET

    def __init__(self) -> None:
        self._host: FunctionHost | None = None

    # -- description --------------------------------------------------
    @property
    @abc.abstractmethod
    def regions(self) -> Sequence[RegionSpec]:
        """Every region index, absent ones included (index == position)."""

    @property
    @abc.abstractmethod
    def irq_specs(self) -> Sequence[IrqSpec]:
        """Every IRQ index (index == position)."""

    def region_fd(self, index: int) -> int | None:
        """An fd backing a mappable region (sent with its REGION_INFO); none by default."""
        return None

    def read_windows(self) -> Sequence[ReadWindow]:
        """Ranges whose reads the compiled lane may answer from memory (see
        ``pci/windows.py``); asked once per connection. None by default."""
        return ()

    def mask_windows(self) -> Sequence[MaskWindow]:
        """MSI-X tables whose mask-bit writes the lane may apply (see ``MaskWindow``)."""
        return ()

    def register_rules(self) -> Sequence[RegisterRule]:
        """Registers whose posted writes the lane may apply (see ``RegisterRule``)."""
        return ()

    @property
    def access_counters(self) -> Counters | None:
        """The telemetry counters holding the windows' stats, if they have any."""
        return None

    @property
    def hot_path(self) -> Any:
        """A compiled device path the lane hands register writes to first (the VF's
        ``struct vl_vf``), or None."""
        return None

    # -- lifecycle ----------------------------------------------------
    @property
    def host(self) -> FunctionHost:
        if self._host is None:
            raise AccessError(errno.ENODEV, f"{self.name}: no client attached")
        return self._host

    @property
    def attached(self) -> bool:
        return self._host is not None

    def attach(self, host: FunctionHost) -> None:
        """A client connected; device state is kept from any earlier client."""
        self._host = host

    def detach(self) -> None:
        """The client went: stop touching its memory and eventfds, keep device state."""
        self._host = None

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the power-on state (DEVICE_RESET, FLR)."""

    # -- accesses -----------------------------------------------------
    @abc.abstractmethod
    def read(self, region: int, offset: int, count: int) -> bytes:
        """A read that the session has bounds-checked against the region size."""

    @abc.abstractmethod
    def write(self, region: int, offset: int, data: memoryview) -> None:
        """A write that the session has bounds-checked against the region size."""

    def set_irqs(self, request: IrqRequest) -> None:
        """Observe a SET_IRQS after its eventfds were applied; fire on TRIGGER.

        The default fires the selected vectors for DATA_NONE/DATA_BOOL TRIGGER
        (the client triggering the interrupt) and ignores MASK/UNMASK. Devices
        with MSI-X override this to keep mask and pending state.
        """
        if request.action == SetIrqsFlags.ACTION_TRIGGER and request.data in (
            SetIrqsFlags.DATA_NONE,
            SetIrqsFlags.DATA_BOOL,
        ):
            for vector in request.selected():
                self.host.irqs.signal(request.index, vector)


def validate_irq_request(specs: Sequence[IrqSpec], request: IrqRequest) -> None:
    """The device-dependent SET_IRQS checks (the codec did flags and sizes)."""
    if request.index >= len(specs):
        raise AccessError(errno.EINVAL, f"IRQ index {request.index} out of range")
    count_available = specs[request.index].count
    action, data = request.action, request.data
    if request.count == 0:
        if not (data == SetIrqsFlags.DATA_NONE and action == SetIrqsFlags.ACTION_TRIGGER):
            raise AccessError(errno.EINVAL, "count 0 is only valid as DATA_NONE|TRIGGER")
        if request.start != 0:
            raise AccessError(errno.EINVAL, "disable-all must start at 0")
        return
    if request.start + request.count > count_available:
        raise AccessError(
            errno.EINVAL,
            f"vectors {request.start}..{request.start + request.count - 1} beyond "
            f"{count_available} of IRQ index {request.index}",
        )
    if request.index in (IrqIndex.ERR, IrqIndex.REQ) and (
        request.start != 0 or request.count != 1 or action != SetIrqsFlags.ACTION_TRIGGER
    ):
        raise AccessError(errno.EINVAL, "ERR and REQ take one vector with TRIGGER")
    if data == SetIrqsFlags.DATA_EVENTFD:
        if request.fds and len(request.fds) != request.count:
            raise AccessError(errno.EINVAL, "eventfd count does not match vector count")
        if action == SetIrqsFlags.ACTION_MASK:
            raise AccessError(errno.EINVAL, "MASK takes no eventfd")
        if action == SetIrqsFlags.ACTION_UNMASK and request.index != IrqIndex.INTX:
            raise AccessError(errno.EINVAL, "an unmask eventfd exists for INTx only")
    if data == SetIrqsFlags.DATA_BOOL and (
        request.bools is None or len(request.bools) != request.count
    ):
        raise AccessError(errno.EINVAL, "DATA_BOOL needs one byte per vector")


def apply_irq_eventfds(irqs: IrqLines, request: IrqRequest) -> IrqRequest:
    """Install, replace or release eventfds; returns the request with ``replaced`` set."""
    action, data = request.action, request.data
    if action != SetIrqsFlags.ACTION_TRIGGER:
        return request
    if request.count == 0:
        irqs.release_index(request.index)
        return request
    if data == SetIrqsFlags.DATA_EVENTFD:
        if request.fds:
            replaced = irqs.install(request.index, request.start, request.fds)
            return IrqRequest(
                request.index, request.flags, request.start, request.count,
                request.fds, request.bools, replaced,
            )
        irqs.release(request.index, request.start, request.count)
    return request

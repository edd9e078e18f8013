"""Command number -> message class registries, and framing helpers.

Three tables, because the same command number means different things depending on the
direction and on the header's type bits: ``CLIENT_REQUESTS`` (what QEMU may send the
server), ``SERVER_REQUESTS`` (DMA_READ/DMA_WRITE, server -> client) and ``REPLIES``.
The connections build their per-connection dispatch dicts from these once, binding the
DMA layout and the negotiated limits, so the hot path is one dict lookup and one call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

from .constants import HEADER_SIZE, HEADER_STRUCT, Command, MessageType
from .messages import (
    BytesLike,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DirtyPagesReply,
    DirtyPagesRequest,
    DmaLayout,
    DmaMapReply,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    Fds,
    IrqInfoReply,
    IrqInfoRequest,
    Message,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
    SetIrqsReply,
    SetIrqsRequest,
    VersionReply,
    VersionRequest,
    _DmaMessage,
)

Decoder = Callable[[BytesLike, Fds], Message]

CLIENT_REQUESTS: Mapping[int, type[Message]] = MappingProxyType({
    Command.VERSION: VersionRequest,
    Command.DMA_MAP: DmaMapRequest,
    Command.DMA_UNMAP: DmaUnmapRequest,
    Command.DEVICE_GET_INFO: DeviceGetInfoRequest,
    Command.DEVICE_GET_REGION_INFO: RegionInfoRequest,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsRequest,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoRequest,
    Command.DEVICE_SET_IRQS: SetIrqsRequest,
    Command.REGION_READ: RegionReadRequest,
    Command.REGION_WRITE: RegionWriteRequest,
    Command.DEVICE_RESET: DeviceResetRequest,
    Command.DIRTY_PAGES: DirtyPagesRequest,
    Command.REGION_WRITE_MULTI: RegionWriteMultiRequest,
})

SERVER_REQUESTS: Mapping[int, type[Message]] = MappingProxyType({
    Command.DMA_READ: DmaReadRequest,
    Command.DMA_WRITE: DmaWriteRequest,
})

REPLIES: Mapping[int, type[Message]] = MappingProxyType({
    Command.VERSION: VersionReply,
    Command.DMA_MAP: DmaMapReply,
    Command.DMA_UNMAP: DmaUnmapReply,
    Command.DEVICE_GET_INFO: DeviceGetInfoReply,
    Command.DEVICE_GET_REGION_INFO: RegionInfoReply,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFdsReply,
    Command.DEVICE_GET_IRQ_INFO: IrqInfoReply,
    Command.DEVICE_SET_IRQS: SetIrqsReply,
    Command.REGION_READ: RegionReadReply,
    Command.REGION_WRITE: RegionWriteReply,
    Command.DMA_READ: DmaReadReply,
    Command.DMA_WRITE: DmaWriteReply,
    Command.DEVICE_RESET: DeviceResetReply,
    Command.DIRTY_PAGES: DirtyPagesReply,
    Command.REGION_WRITE_MULTI: RegionWriteMultiReply,
})

NOT_IMPLEMENTED_COMMANDS = frozenset({
    Command.DIRTY_PAGES,
    Command.DEVICE_FEATURE,
    Command.MIG_DATA_READ,
    Command.MIG_DATA_WRITE,
})
"""Defined by the protocol but not served (retired, or migration): refused with ENOSYS,
while numbers that are no command at all (0, >= 19) get EINVAL like libvfio-user."""


def decoder_for(cls: type[Message], layout: DmaLayout = DmaLayout.QEMU) -> Decoder:
    """``cls.decode`` with the DMA layout bound for the two layout-dependent messages."""
    if issubclass(cls, _DmaMessage):
        return partial(cls.decode, layout=layout)
    return cls.decode


def encode_body(message: Message, layout: DmaLayout = DmaLayout.QEMU) -> bytes:
    if isinstance(message, _DmaMessage):
        return message.encode(layout)
    return message.encode()


def frame(msg_id: int, command: int, body: BytesLike = b"", flags: int = 0,
          error: int = 0, size: int | None = None) -> bytes:
    """A raw message. ``size`` overrides the header's size field (tests use it to build
    broken framing); everything else is taken literally."""
    if size is None:
        size = HEADER_SIZE + len(body)
    return HEADER_STRUCT.pack(msg_id, command, size, flags, error) + bytes(body)


def encode_frame(msg_id: int, message: Message, *, flags: int = 0, error: int = 0,
                 layout: DmaLayout = DmaLayout.QEMU) -> bytes:
    """A complete message for ``message``; the type bits come from ``message.IS_REPLY``
    and are OR-ed into ``flags`` (use flags for NO_REPLY / ERROR)."""
    body = encode_body(message, layout)
    mtype = MessageType.REPLY if message.IS_REPLY else MessageType.COMMAND
    return frame(msg_id, message.COMMAND, body, flags | mtype, error)

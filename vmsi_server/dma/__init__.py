"""Guest memory: DMA_MAP'd ranges and the bounds-checked access the device uses.

Only ``GuestMemory`` and its errors are public; the mmap objects behind it stay
private so that DMA_UNMAP can actually drop every reference to the guest's memory.
"""

from vmsi_server.dma.errors import MEMFD_HINT, DmaError, DmaNotAccessible, FaultKind
from vmsi_server.dma.mapping import DMA_FLAG_READ, DMA_FLAG_WRITE, MappingInfo
from vmsi_server.dma.memory import MAX_MAPPING_SIZE, GuestMemory

__all__ = [
    "DMA_FLAG_READ",
    "DMA_FLAG_WRITE",
    "MAX_MAPPING_SIZE",
    "MEMFD_HINT",
    "DmaError",
    "DmaNotAccessible",
    "FaultKind",
    "GuestMemory",
    "MappingInfo",
]

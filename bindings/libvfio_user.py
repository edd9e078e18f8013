"""ctypes bindings to libvfio-user: the part of its API a device server needs.

The library is not packaged anywhere; users build it themselves (see the
README) and point the server at it with ``--libvfio-user PATH`` or
``LIBVFIO_USER_SO``, or install it where the dynamic linker finds it.
``load()`` resolves it in that order and checks what can be checked of the
ABI against these declarations before anything runs:

* every function declared here must be exported (a missing one names itself);
* ``dma_sg_size()`` must equal ``sizeof(dma_sg_t)`` as laid out here;
* the eventfd table the library keeps per context (``vfu_ctx->irqs``) is found
  by its contents, not by a hard-coded offset (see ``IrqTable.locate``), and a
  failed match is an error naming what was expected.

The C declarations are quoted next to each ctypes one (libvfio-user.h,
``LIB_VFIO_USER_MAJOR`` 0, ``MINOR`` 2). Nothing here knows about devices:
``bindings.adapter`` runs a ``PciFunction`` on top of this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

ENV_VAR = "LIBVFIO_USER_SO"
LIBRARY_NAME = "vfio-user"

# -- constants (libvfio-user.h) ---------------------------------------------
LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0

VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_RW = VFU_REGION_FLAG_READ | VFU_REGION_FLAG_WRITE
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
VFU_REGION_FLAG_64_BITS = 1 << 4
VFU_REGION_FLAG_PREFETCH = 1 << 5

VFU_CAP_FLAG_EXTENDED = 1 << 0
VFU_CAP_FLAG_CALLBACK = 1 << 1
VFU_CAP_FLAG_READONLY = 1 << 2

PCI_HEADER_TYPE_NORMAL = 0
VFU_PCI_DEV_CFG_REGION_IDX = 7
VFU_PCI_DEV_NUM_REGIONS = 9


class VfuPciType(IntEnum):
    CONVENTIONAL = 0
    PCI_X_1 = 1
    PCI_X_2 = 2
    EXPRESS = 3


class VfuIrqType(IntEnum):
    """``enum vfu_dev_irq_type``: the same numbers as the vfio IRQ indexes."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


VFU_DEV_NUM_IRQS = 5


class VfuResetType(IntEnum):
    DEVICE = 0
    LOST_CONN = 1
    PCI_FLR = 2


# syslog levels, as the log callback receives them
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6
LOG_DEBUG = 7


# -- structures ------------------------------------------------------------------
class Iovec(Structure):
    """``struct iovec { void *iov_base; size_t iov_len; }``"""

    _fields_ = (("iov_base", c_void_p), ("iov_len", c_size_t))


class VfuDmaInfo(Structure):
    """``vfu_dma_info_t``::

        struct iovec iova;     /* guest address range */
        void *vaddr;           /* NULL unless the library mmapped the fd */
        struct iovec mapping;  /* the whole mmap (page aligned) */
        size_t page_size;
        uint32_t prot;         /* PROT_READ | PROT_WRITE */
    """

    _fields_ = (
        ("iova", Iovec),
        ("vaddr", c_void_p),
        ("mapping", Iovec),
        ("page_size", c_size_t),
        ("prot", c_uint32),
    )


class DmaSg(Structure):
    """``struct dma_sg`` (lib/dma.h; opaque in the public header, sized by
    ``dma_sg_size()``)::

        vfu_dma_addr_t dma_addr; const dma_memory_region_t *region;
        uint64_t length; uint64_t offset; bool writeable;
    """

    _fields_ = (
        ("dma_addr", c_void_p),
        ("region", c_void_p),
        ("length", c_uint64),
        ("offset", c_uint64),
        ("writeable", c_bool),
    )


# -- callback types ----------------------------------------------------------------
# typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
LOG_FN = CFUNCTYPE(None, c_void_p, c_int, c_char_p)
# typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *, char *buf, size_t count,
#                                          loff_t offset, bool is_write);
REGION_ACCESS_CB = CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t, c_int64, c_bool,
                             use_errno=True)
# typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, vfu_reset_type_t type);
RESET_CB = CFUNCTYPE(c_int, c_void_p, c_int, use_errno=True)
# typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *, vfu_dma_info_t *info);  (and unregister)
DMA_CB = CFUNCTYPE(None, c_void_p, POINTER(VfuDmaInfo))
# typedef void (vfu_dev_irq_state_cb_t)(vfu_ctx_t *, uint32_t start, uint32_t count, bool mask);
IRQ_STATE_CB = CFUNCTYPE(None, c_void_p, c_uint32, c_uint32, c_bool)

# name: (restype, argtypes)
_PROTOTYPES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "vfu_create_ctx": (c_void_p, (c_int, c_char_p, c_int, c_void_p, c_int)),
    "vfu_realize_ctx": (c_int, (c_void_p,)),
    "vfu_attach_ctx": (c_int, (c_void_p,)),
    "vfu_get_poll_fd": (c_int, (c_void_p,)),
    "vfu_run_ctx": (c_int, (c_void_p,)),
    "vfu_destroy_ctx": (None, (c_void_p,)),
    "vfu_get_private": (c_void_p, (c_void_p,)),
    "vfu_setup_log": (c_int, (c_void_p, LOG_FN, c_int)),
    "vfu_setup_region": (
        c_int,
        (c_void_p, c_int, c_size_t, REGION_ACCESS_CB, c_int, POINTER(Iovec), c_uint32,
         c_int, c_uint64),
    ),
    "vfu_setup_device_reset_cb": (c_int, (c_void_p, RESET_CB)),
    "vfu_setup_device_dma": (c_int, (c_void_p, c_size_t, DMA_CB, DMA_CB)),
    "vfu_setup_device_nr_irqs": (c_int, (c_void_p, c_int, c_uint32)),
    "vfu_setup_irq_state_callback": (c_int, (c_void_p, c_int, IRQ_STATE_CB)),
    "vfu_irq_trigger": (c_int, (c_void_p, c_uint32)),
    "vfu_addr_to_sgl": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_int)),
    "vfu_sgl_get": (c_int, (c_void_p, c_void_p, POINTER(Iovec), c_size_t, c_int)),
    "vfu_sgl_put": (None, (c_void_p, c_void_p, POINTER(Iovec), c_size_t)),
    "vfu_sgl_read": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_int)),
    "vfu_sgl_write": (c_int, (c_void_p, c_void_p, c_size_t, c_void_p, c_int)),
    "dma_sg_size": (c_size_t, ()),
    "vfu_pci_init": (c_int, (c_void_p, c_int, c_int, c_int)),
    "vfu_pci_set_id": (None, (c_void_p, c_uint16, c_uint16, c_uint16, c_uint16)),
    "vfu_pci_set_class": (None, (c_void_p, c_uint8, c_uint8, c_uint8)),
    "vfu_pci_get_config_space": (c_void_p, (c_void_p,)),
    "vfu_pci_add_capability": (c_ssize_t, (c_void_p, c_size_t, c_int, c_void_p)),
    "vfu_pci_find_capability": (c_size_t, (c_void_p, c_bool, c_int)),
}


# -- errors ----------------------------------------------------------------------------
class LibvfioUserError(Exception):
    """libvfio-user is absent, unusable, or does not match these bindings."""


class LibraryNotFound(LibvfioUserError):
    pass


class AbiMismatch(LibvfioUserError):
    pass


def call_error(what: str) -> OSError:
    """An OSError from the errno a failed library call left behind."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


# -- loading ---------------------------------------------------------------------------
NOT_FOUND_HELP = (
    "libvfio-user was not found. It is in no package registry: build it from its "
    "source (github.com/nutanix/libvfio-user, meson + ninja; see README.md, "
    "'libvfio-user backend') and point the server at the shared object with "
    f"--libvfio-user /path/to/libvfio-user.so.0 or {ENV_VAR}=/path/to/libvfio-user.so.0, "
    "or install it where the dynamic linker finds it (ldconfig)."
)


def resolve_path(explicit: str | None = None) -> str:
    """The library to load: explicit path, then $LIBVFIO_USER_SO, then the linker's search."""
    for origin, candidate in (("--libvfio-user", explicit), (ENV_VAR, os.environ.get(ENV_VAR))):
        if candidate:
            # A bare soname ("libvfio-user.so.0") is left to the dynamic linker.
            if "/" in candidate and not os.path.exists(candidate):
                raise LibraryNotFound(f"{origin} names {candidate}, which does not exist. "
                                      + NOT_FOUND_HELP)
            return candidate
    found = ctypes.util.find_library(LIBRARY_NAME)
    if found is None:
        raise LibraryNotFound(NOT_FOUND_HELP)
    return found


@dataclass(frozen=True)
class Library:
    """A loaded, checked libvfio-user: ``lib.fn`` are the declared functions."""

    path: str
    fn: ctypes.CDLL

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


_loaded: dict[str, Library] = {}


def load(path: str | None = None) -> Library:
    """Load and check libvfio-user (once per resolved path)."""
    resolved = resolve_path(path)
    cached = _loaded.get(resolved)
    if cached is not None:
        return cached
    try:
        cdll = ctypes.CDLL(resolved, use_errno=True)
    except OSError as exc:
        raise LibraryNotFound(f"cannot load {resolved}: {exc}. " + NOT_FOUND_HELP) from exc
    missing = [name for name in _PROTOTYPES if not hasattr(cdll, name)]
    if missing:
        raise AbiMismatch(
            f"{resolved} does not export {', '.join(missing)}: not the libvfio-user these "
            "bindings were written against (header version 0.2, API of 2025-2026)"
        )
    for name, (restype, argtypes) in _PROTOTYPES.items():
        function = getattr(cdll, name)
        function.restype = restype
        function.argtypes = argtypes
    sg_size = cdll.dma_sg_size()
    if sg_size != ctypes.sizeof(DmaSg):
        raise AbiMismatch(
            f"{resolved}: dma_sg_size() is {sg_size} but the bindings' struct dma_sg is "
            f"{ctypes.sizeof(DmaSg)} bytes; update bindings.libvfio_user.DmaSg"
        )
    library = Library(resolved, cdll)
    _loaded[resolved] = library
    return library


def available(path: str | None = None) -> str | None:
    """None when the library loads and checks out, else the reason it does not."""
    try:
        load(path)
    except LibvfioUserError as exc:
        return str(exc)
    return None


# -- the eventfd table inside a context -----------------------------------------------
_PROC_MEM = "/proc/self/mem"
_SCAN_BYTES = 64 * 1024
_PTR = ctypes.sizeof(c_void_p)


class IrqTable:
    """Read-only view of the eventfds libvfio-user holds for a context.

    libvfio-user keeps the eventfds of SET_IRQS itself and tells the device
    nothing about them (only MASK/UNMASK reach a callback). To keep the
    project's MSI-X semantics (pending bits delivered when an eventfd arrives,
    swap counters, "no eventfd" as a pending reason) the adapter must see them.
    The public API has no getter, so this reads ``vfu_ctx->irqs`` (lib/private.h)::

        uint32_t irq_count[VFU_DEV_NUM_IRQS];          /* what we set */
        vfu_dev_irq_state_cb_t *irq_state_cbs[VFU_DEV_NUM_IRQS]; /* what we set */
        vfu_irqs_t *irqs;  /* { int err_efd; int req_efd; uint32_t max_ivs; int efds[]; } */

    The block is found by its contents (our counts and our callback pointer,
    followed by a table whose max_ivs and "-1" fds match), scanning the context
    through /proc/self/mem so a wrong guess can never fault. Exactly one match
    is required; anything else is an ``AbiMismatch`` naming what was sought.
    It is only read: signalling goes through ``vfu_irq_trigger``.
    """

    def __init__(self, address: int, max_ivs: int) -> None:
        self.address = address
        self.max_ivs = max_ivs
        self._err = c_int.from_address(address)
        self._req = c_int.from_address(address + 4)
        self._efds = (c_int * max_ivs).from_address(address + 12) if max_ivs else None
        self._raw_size = 12 + 4 * max_ivs

    @classmethod
    def locate(cls, ctx: int, counts: tuple[int, ...], callbacks: tuple[int, ...]) -> IrqTable:
        """Find the table of a realized, not yet attached context."""
        if len(counts) != VFU_DEV_NUM_IRQS or len(callbacks) != VFU_DEV_NUM_IRQS:
            raise ValueError("one count and one callback address per IRQ type")
        max_ivs = max(counts)
        blob = _read_self(ctx, _SCAN_BYTES)
        want_counts = struct.pack(f"<{VFU_DEV_NUM_IRQS}I", *counts)
        cbs_gap = -(-len(want_counts) // _PTR) * _PTR
        want_cbs = struct.pack(f"<{VFU_DEV_NUM_IRQS}Q", *callbacks)
        matches: list[int] = []
        start = 0
        while True:
            at = blob.find(want_counts, start)
            if at < 0:
                break
            start = at + 4
            if at % 4:
                continue
            cbs_at = at + cbs_gap
            irqs_at = cbs_at + len(want_cbs)
            if blob[cbs_at:irqs_at] != want_cbs or irqs_at + _PTR > len(blob):
                continue
            (irqs,) = struct.unpack_from("<Q", blob, irqs_at)
            if not irqs:
                continue
            try:
                head = _read_self(irqs, 12 + 4 * max_ivs)
            except OSError:
                continue
            err_efd, req_efd, ivs = struct.unpack_from("<iiI", head)
            efds = struct.unpack_from(f"<{max_ivs}i", head, 12)
            if (err_efd, req_efd, ivs) == (-1, -1, max_ivs) and all(fd == -1 for fd in efds):
                matches.append(irqs)
        # Copies of the block can turn up further on (our own read buffers are on the
        # same heap); they all name the same table, which is what counts.
        matches = sorted(set(matches))
        if len(matches) != 1:
            raise AbiMismatch(
                f"cannot locate libvfio-user's eventfd table in struct vfu_ctx at {ctx:#x}: "
                f"{len(matches)} matches for irq_count={counts} followed by the irq state "
                f"callbacks and a vfu_irqs_t with max_ivs={max_ivs} (lib/private.h changed?)"
            )
        return cls(matches[0], max_ivs)

    def raw(self) -> bytes:
        """The whole table as bytes: a cheap "did anything change" key."""
        return ctypes.string_at(self.address, self._raw_size)

    def efd(self, subindex: int) -> int:
        assert self._efds is not None
        return int(self._efds[subindex])

    @property
    def err_efd(self) -> int:
        return int(self._err.value)

    @property
    def req_efd(self) -> int:
        return int(self._req.value)


def _read_self(address: int, size: int) -> bytes:
    """Read our own memory without risking a fault (EIO past a mapping's end)."""
    fd = os.open(_PROC_MEM, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < size:
            try:
                chunk = os.pread(fd, min(4096, size - len(out)), address + len(out))
            except OSError:
                if not out:
                    raise
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def function_address(callback: Any) -> int:
    """The C address of a ctypes callback object (for ``IrqTable.locate``)."""
    value = ctypes.cast(callback, c_void_p).value
    return int(value or 0)

"""Run the project's ``PciFunction``s on libvfio-user instead of the engine.

``LibvfioUserServer`` has the shape of ``vmsi_server.server.Server`` (a loop,
endpoints, ``add_function``, ``on_close``, signal handling, ``run``), so
``app.build_server`` assembles the same PF, VFs, MSI-X controllers, slow path
and control socket on either backend.

One ``LibvfioUserDevice`` per function: a libvfio-user context created with
``LIBVFIO_USER_FLAG_ATTACH_NB`` whose poll fd lives in our ``EventLoop``, so
NIC taps, EITR timers and the slow-path watch keep running beside it:

* listening: the listen fd is a reader; when it is readable,
  ``vfu_attach_ctx`` accepts and negotiates (libvfio-user reads the VERSION
  synchronously there); a second client while one is served is accepted on a
  dup of the listen fd and closed at once, as the engine does;
* connected: the connection fd is a reader; each readiness runs
  ``vfu_run_ctx`` (one message per call in non-blocking mode) until it has
  nothing left, and after every message the eventfd table is compared with
  its previous state (``LibvfioUserIrqLines.changes``) so the function sees
  SET_IRQS eventfd changes as it does on the engine;
* ``ENOTCONN`` from ``vfu_run_ctx`` means the client went (the library has
  already unmapped its memory and closed its eventfds): back to listening.

Config space stays ours: region 7 is set up with ``VFU_REGION_FLAG_ALWAYS_CB``
so every config access reaches the function's ``ConfigSpace`` (capabilities,
BAR sizing, MSI-X enable/function mask events, FLR) and libvfio-user's own
config-space emulation is never used. ``vfu_pci_init``/``set_id``/``set_class``
still run so the library's idea of the device agrees with ours.

Differences from the engine are listed in docs/libvfio-user.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from bindings import libvfio_user as vfu
from bindings.irqs import LibvfioUserIrqLines
from vmsi_server.dma.errors import DmaError
from vmsi_server.dma.memory import GuestMemory
from vmsi_server.pci.function import AccessError, IrqRequest, PciFunction
from vmsi_server.protocol.constants import (
    Command,
    IrqIndex,
    RegionIndex,
    RegionInfoFlags,
    SetIrqsFlags,
)
from vmsi_server.session import SessionLimits
from vmsi_server.telemetry.logsetup import debug_enabled
from vmsi_server.telemetry.messages import MessageCounters
from vmsi_server.transport.listener import SocketInUse, _clear_stale
from vmsi_server.transport.loop import EventLoop
from vmsi_server.transport.signals import StopOnSignals

log = structlog.get_logger("vmsi.libvfio_user")

_LOG_LEVELS = {
    0: "error", 1: "error", 2: "error", vfu.LOG_ERR: "info",
    vfu.LOG_WARNING: "warning", vfu.LOG_NOTICE: "info", vfu.LOG_INFO: "info",
    vfu.LOG_DEBUG: "debug",
}
_CONFIG_CONVENTIONAL = 256


class LibvfioUserDevice:
    """One function served by one libvfio-user context; also its ``FunctionHost``.

    Quacks like the engine's ``Endpoint`` for telemetry (``name``, ``function``,
    ``session``, ``sessions_served``, ``refused``, ``counters``) and like a
    ``Session`` while a client is attached (``session`` is the device itself).
    """

    def __init__(
        self,
        lib: vfu.Library,
        function: PciFunction,
        socket_path: str,
        loop: EventLoop,
        limits: SessionLimits | None = None,
        name: str | None = None,
    ) -> None:
        self.lib = lib
        self.function = function
        self.name = name or function.name
        self.socket_path = socket_path
        self._loop = loop
        self.limits = limits or SessionLimits()
        self.counters = MessageCounters()
        self.sessions_served = 0
        self.refused = 0
        self._memory = GuestMemory(max_maps=self.limits.max_dma_maps)
        self._attached = False
        self._conn_fd: int | None = None
        self._closed = False
        self._keep: list[Any] = []  # ctypes callbacks must outlive the context
        self._ctx = self._create()
        try:
            self._listen_fd = lib.vfu_get_poll_fd(self._ctx)
            if self._listen_fd < 0:
                raise vfu.call_error("vfu_get_poll_fd")
            # A dup to refuse second clients on; the library's fd stays the library's.
            self._refuser = socket.socket(fileno=os.dup(self._listen_fd))
            self._refuser.setblocking(False)
        except BaseException:
            lib.vfu_destroy_ctx(self._ctx)
            raise
        loop.add_reader(self._listen_fd, self._on_listen_readable)
        log.info("server.listening", device=self.name, socket=socket_path,
                 backend="libvfio-user", library=lib.path)

    # -- FunctionHost / Session-like -----------------------------------
    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def irqs(self) -> LibvfioUserIrqLines:
        return self._irqs

    @property
    def loop(self) -> EventLoop:
        return self._loop

    @property
    def session(self) -> LibvfioUserDevice | None:
        return self if self._attached else None

    @property
    def ctx(self) -> int:
        return self._ctx

    # -- setup ---------------------------------------------------------------
    def _create(self) -> int:
        lib = self.lib
        _clear_stale(self.socket_path)
        old_umask = os.umask(0o177)
        try:
            ctx = lib.vfu_create_ctx(vfu.VFU_TRANS_SOCK, os.fsencode(self.socket_path),
                                     vfu.LIBVFIO_USER_FLAG_ATTACH_NB, None,
                                     vfu.VFU_DEV_TYPE_PCI)
        finally:
            os.umask(old_umask)
        if not ctx:
            err = ctypes.get_errno()
            if err == errno.EADDRINUSE:
                raise SocketInUse(f"a server is already listening on {self.socket_path}")
            raise OSError(err, f"vfu_create_ctx({self.socket_path}): {os.strerror(err)}")
        try:
            os.chmod(self.socket_path, 0o600)
            self._setup(ctx)
        except BaseException:
            lib.vfu_destroy_ctx(ctx)
            raise
        return int(ctx)

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise vfu.call_error(what)

    def _setup(self, ctx: int) -> None:
        lib, function = self.lib, self.function
        log_cb = vfu.LOG_FN(self._on_log)
        self._keep.append(log_cb)
        level = vfu.LOG_DEBUG if debug_enabled() else vfu.LOG_NOTICE
        self._check(lib.vfu_setup_log(ctx, log_cb, level), "vfu_setup_log")

        regions = function.regions
        config = regions[RegionIndex.CONFIG]
        pci_type = (vfu.VfuPciType.EXPRESS if config.size > _CONFIG_CONVENTIONAL
                    else vfu.VfuPciType.CONVENTIONAL)
        self._check(lib.vfu_pci_init(ctx, pci_type, vfu.PCI_HEADER_TYPE_NORMAL, 0),
                    "vfu_pci_init")
        header = function.read(RegionIndex.CONFIG, 0, 0x30)
        vid, did = struct.unpack_from("<HH", header, 0)
        ssvid, ssid = struct.unpack_from("<HH", header, 0x2C)
        lib.vfu_pci_set_id(ctx, vid, did, ssvid, ssid)
        lib.vfu_pci_set_class(ctx, header[0x0B], header[0x0A], header[0x09])

        for spec in regions:
            if not spec.present:
                continue
            flags = 0
            if spec.flags & RegionInfoFlags.READ:
                flags |= vfu.VFU_REGION_FLAG_READ
            if spec.flags & RegionInfoFlags.WRITE:
                flags |= vfu.VFU_REGION_FLAG_WRITE
            if spec.index == RegionIndex.CONFIG:
                flags = vfu.VFU_REGION_FLAG_RW | vfu.VFU_REGION_FLAG_ALWAYS_CB
            elif spec.index <= RegionIndex.BAR5:
                flags |= vfu.VFU_REGION_FLAG_MEM
            areas = None
            nr_areas = 0
            fd = -1
            region_fd = function.region_fd(spec.index) if spec.mmap_areas else None
            if region_fd is not None:
                areas = (vfu.Iovec * len(spec.mmap_areas))(
                    *(vfu.Iovec(offset, size) for offset, size in spec.mmap_areas)
                )
                nr_areas = len(spec.mmap_areas)
                fd = region_fd
            callback = vfu.REGION_ACCESS_CB(self._region_callback(spec.index))
            self._keep.append(callback)
            self._check(
                lib.vfu_setup_region(ctx, spec.index, spec.size, callback, flags, areas,
                                     nr_areas, fd, 0),
                f"vfu_setup_region({spec.index})",
            )

        counts = [0] * vfu.VFU_DEV_NUM_IRQS
        for irq in function.irq_specs:
            if irq.index < vfu.VFU_DEV_NUM_IRQS:
                counts[irq.index] = irq.count
                self._check(lib.vfu_setup_device_nr_irqs(ctx, irq.index, irq.count),
                            f"vfu_setup_device_nr_irqs({irq.index})")
        irq_state = vfu.IRQ_STATE_CB(self._on_irq_state)
        self._keep.append(irq_state)
        callbacks = [0] * vfu.VFU_DEV_NUM_IRQS
        if counts[IrqIndex.MSIX]:
            self._check(lib.vfu_setup_irq_state_callback(ctx, vfu.VfuIrqType.MSIX, irq_state),
                        "vfu_setup_irq_state_callback")
            callbacks[IrqIndex.MSIX] = vfu.function_address(irq_state)

        dma_register = vfu.DMA_CB(self._on_dma_register)
        dma_unregister = vfu.DMA_CB(self._on_dma_unregister)
        reset = vfu.RESET_CB(self._on_reset)
        self._keep += [dma_register, dma_unregister, reset]
        self._check(lib.vfu_setup_device_dma(ctx, self.limits.max_dma_maps, dma_register,
                                             dma_unregister), "vfu_setup_device_dma")
        self._check(lib.vfu_setup_device_reset_cb(ctx, reset), "vfu_setup_device_reset_cb")
        self._check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")

        table = vfu.IrqTable.locate(ctx, tuple(counts), tuple(callbacks))
        self._irqs = LibvfioUserIrqLines(lib, ctx, table, counts)

    # -- callbacks from inside vfu_run_ctx ------------------------------------
    def _region_callback(self, index: int) -> Callable[[int, int, int, int, bool], int]:
        function = self.function
        record = self.counters.record
        memmove, string_at, set_errno = ctypes.memmove, ctypes.string_at, ctypes.set_errno
        now = time.perf_counter_ns
        read_cmd, write_cmd = Command.REGION_READ, Command.REGION_WRITE

        def access(_ctx: int, buf: int, count: int, offset: int, is_write: bool) -> int:
            t0 = now()
            command = write_cmd if is_write else read_cmd
            try:
                if is_write:
                    function.write(index, offset, memoryview(string_at(buf, count)))
                else:
                    data = function.read(index, offset, count)
                    if len(data) != count:
                        raise AccessError(errno.EIO, f"read of {count} returned {len(data)}")
                    memmove(buf, data, count)
            except (AccessError, DmaError) as exc:
                self.counters.error(command)
                if debug_enabled():
                    log.debug("session.request_failed", device=self.name, command=command,
                              errno=exc.errno, reason=str(exc))
                set_errno(exc.errno)
                return -1
            except Exception as exc:  # a device bug must not take the server down
                self.counters.error(command)
                log.exception("session.handler_crashed", device=self.name, command=command,
                              error=repr(exc))
                set_errno(errno.EIO)
                return -1
            record(command, now() - t0)
            return count

        return access

    def _on_log(self, _ctx: int, level: int, message: bytes | None) -> None:
        text = (message or b"").decode(errors="replace").rstrip()
        method = _LOG_LEVELS.get(level, "info")
        getattr(log, method)("libvfio_user.log", device=self.name, message=text)

    def _on_dma_register(self, _ctx: int, info_p: Any) -> None:
        t0 = time.perf_counter_ns()
        try:
            info = info_p.contents
            iova = info.iova.iov_base or 0
            size = info.iova.iov_len
            flags = info.prot & 0x3  # PROT_READ/PROT_WRITE are DMA_MAP's READ/WRITE bits
            if info.vaddr:
                buffer = (ctypes.c_ubyte * size).from_address(info.vaddr)
                self._memory.add_mapped(iova, size, buffer, flags)
            else:
                self._memory.add(iova, size, None, 0, flags)
        except Exception as exc:
            # The library has already accepted the map; we can only refuse access.
            self.counters.error(Command.DMA_MAP)
            log.error("dma.register_failed", device=self.name, error=repr(exc))
            return
        self.counters.record(Command.DMA_MAP, time.perf_counter_ns() - t0)

    def _on_dma_unregister(self, _ctx: int, info_p: Any) -> None:
        t0 = time.perf_counter_ns()
        try:
            info = info_p.contents
            self._memory.remove(info.iova.iov_base or 0, info.iova.iov_len)
        except DmaError:
            pass  # never registered (its register failed)
        except Exception as exc:
            log.exception("dma.unregister_failed", device=self.name, error=repr(exc))
        self.counters.record(Command.DMA_UNMAP, time.perf_counter_ns() - t0)

    def _on_reset(self, _ctx: int, reason: int) -> int:
        try:
            if reason == vfu.VfuResetType.LOST_CONN:
                # Called before the library closes the connection: unwatch it while
                # the fd is still ours to name (epoll refuses a closed one).
                self._unwatch_conn()
                self._detach_function()
                return 0
            t0 = time.perf_counter_ns()
            self.function.reset()
            if reason == vfu.VfuResetType.DEVICE:
                log.info("session.device_reset", device=self.name)
                self.counters.record(Command.DEVICE_RESET, time.perf_counter_ns() - t0)
            return 0
        except Exception as exc:
            log.exception("session.reset_failed", device=self.name, error=repr(exc))
            ctypes.set_errno(errno.EIO)
            return -1

    def _on_irq_state(self, _ctx: int, start: int, count: int, mask: bool) -> None:
        action = SetIrqsFlags.ACTION_MASK if mask else SetIrqsFlags.ACTION_UNMASK
        self._set_irqs(IrqRequest(IrqIndex.MSIX, action | SetIrqsFlags.DATA_NONE, start, count))

    def _set_irqs(self, request: IrqRequest) -> None:
        t0 = time.perf_counter_ns()
        try:
            self.function.set_irqs(request)
        except Exception as exc:
            self.counters.error(Command.DEVICE_SET_IRQS)
            log.warning("session.set_irqs_failed", device=self.name, error=repr(exc))
            return
        self.counters.record(Command.DEVICE_SET_IRQS, time.perf_counter_ns() - t0)

    # -- loop side --------------------------------------------------------------
    def _on_listen_readable(self) -> None:
        if self._attached:
            self._on_conn_readable()  # a QEMU restart: the old client's EOF may be queued
        if self._attached:
            self._refuse()
            return
        t0 = time.perf_counter_ns()
        if self.lib.vfu_attach_ctx(self._ctx) < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                self.counters.error(Command.VERSION)
                log.warning("session.attach_failed", device=self.name, errno=err,
                            reason=os.strerror(err))
            return
        self.counters.record(Command.VERSION, time.perf_counter_ns() - t0)
        self._attached = True
        self.sessions_served += 1
        self._conn_fd = self.lib.vfu_get_poll_fd(self._ctx)
        self._irqs.forget()
        self.function.attach(self)
        self._loop.add_reader(self._conn_fd, self._on_conn_readable)
        log.info("session.connected", device=self.name, backend="libvfio-user")

    def _refuse(self) -> None:
        try:
            conn, _ = self._refuser.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.refused += 1
        log.warning("server.client_refused", device=self.name, reason="busy")
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    def _on_conn_readable(self) -> None:
        lib, ctx = self.lib, self._ctx
        changes = self._irqs.changes
        while self._attached:
            rc = lib.vfu_run_ctx(ctx)
            if rc > 0:
                for request in changes():
                    self._set_irqs(request)
                continue
            if rc == 0:
                return
            err = ctypes.get_errno()
            if (err == errno.ENOTCONN or self._conn_fd is None
                    or lib.vfu_get_poll_fd(ctx) != self._conn_fd):
                self._lost(f"client disconnected ({os.strerror(err)})")
            elif err not in (errno.EAGAIN, errno.EINTR):
                log.warning("session.run_failed", device=self.name, errno=err,
                            reason=os.strerror(err))
            return

    def _detach_function(self) -> None:
        if self.function.attached and self.function.host is self:
            self.function.detach()

    def _unwatch_conn(self) -> None:
        if self._conn_fd is not None:
            self._loop.remove_reader(self._conn_fd)
            self._conn_fd = None

    def _lost(self, reason: str) -> None:
        self._unwatch_conn()
        self._attached = False
        self._detach_function()
        self._memory.remove_all()
        self._irqs.forget()
        log.info("session.closed", device=self.name, reason=reason,
                 messages=self.counters.total())
        log.info("server.listening_again", device=self.name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._listen_fd)
        self._unwatch_conn()
        self._attached = False
        # Detaches the client (reset callback), closes the fds and unlinks the socket.
        self.lib.vfu_destroy_ctx(self._ctx)
        self._detach_function()
        self._refuser.close()
        self._memory.close()


class LibvfioUserServer:
    """``Server``'s shape on libvfio-user: one context per function, our loop."""

    def __init__(
        self,
        library: str | None = None,
        loop: EventLoop | None = None,
        limits: SessionLimits | None = None,
    ) -> None:
        self.lib = vfu.load(library)
        self.loop = loop or EventLoop(fast_lane=False)  # its sessions are libvfio-user's
        self.limits = limits or SessionLimits()
        self.endpoints: list[LibvfioUserDevice] = []
        self._closers: list[Callable[[], None]] = []
        self._signals: StopOnSignals | None = None

    def add_function(
        self,
        function: PciFunction,
        socket_path: str | None = None,
        fd: int | None = None,
        name: str | None = None,
    ) -> LibvfioUserDevice:
        if fd is not None or socket_path is None:
            raise ValueError("libvfio-user listens on a socket path it binds itself; "
                             "--fd is for the engine backend only")
        device = LibvfioUserDevice(self.lib, function, socket_path, self.loop,
                                   limits=self.limits, name=name)
        self.endpoints.append(device)
        return device

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def install_signal_handlers(
        self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        self._signals = StopOnSignals(self.loop, signals)

    def run(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.close()

    def close(self) -> None:
        for device in self.endpoints:
            with contextlib.suppress(Exception):
                device.close()
        self.endpoints.clear()
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        log.info("server.stopped")


def server_command(socket_path: str, library: str | None = None,
                   *extra: str) -> list[str]:
    """argv that serves one VF on libvfio-user at ``socket_path`` (for benchmarks)."""
    import sys

    argv = [sys.executable, "-m", "vmsi_server", "--backend", "libvfio-user",
            "--socket-path", socket_path]
    if library is not None:
        argv += ["--libvfio-user", library]
    return [*argv, *extra]

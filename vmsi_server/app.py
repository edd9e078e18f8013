"""Assemble a running server from a configuration: PF, VFs, taps, slow path.

Kept apart from ``cli.py`` so tests and tools build the same server in-process
(``build_server``) that the command line runs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from vmsi_server import fastlane
from vmsi_server.msix.policy import PathPolicy
from vmsi_server.msix.slowpath import SlowPath
from vmsi_server.nic.backend.base import PacketBackend
from vmsi_server.nic.backend.tap import TapBackend
from vmsi_server.nic.pf import Pf, parse_mac
from vmsi_server.nic.vf_function import Igb82576Vf
from vmsi_server.pci.function import PciFunction
from vmsi_server.pci.irq_lines import IrqLines
from vmsi_server.server import Server
from vmsi_server.session import SessionLimits
from vmsi_server.telemetry.control import ControlServer
from vmsi_server.telemetry.counters import Counters
from vmsi_server.telemetry.messages import MessageCounters
from vmsi_server.telemetry.snapshot import server_snapshot
from vmsi_server.transport.loop import EventLoop

log = structlog.get_logger("vmsi.app")

BACKENDS = ("engine", "libvfio-user")


@dataclass
class ServerConfig:
    """Everything a server run needs; built from CLI args or directly by tests."""

    socket_paths: list[str] = field(default_factory=list)
    listen_fd: int | None = None
    vfs: int = 1
    taps: list[str] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    policy: PathPolicy = PathPolicy.SHADOW
    slowpath: bool = True
    slowpath_timeout: float = 1.0
    control_socket: str | None = None
    time_fast_path: bool = False
    """Time fast-path MSI-X accesses too (forwarded ones are always timed)."""
    limits: SessionLimits = field(default_factory=SessionLimits)
    backend: str = "engine"
    fast_lane: bool | None = None
    """The compiled lane (``vmsi_server.fastlane``): None uses it when built."""
    libvfio_user: str | None = None
    """Path of libvfio-user.so for backend libvfio-user (else $LIBVFIO_USER_SO, then
    the dynamic linker's search)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        if args.vfs < 1:
            raise ValueError("--vfs must be at least 1")
        if args.fd is not None and args.vfs != 1:
            raise ValueError("--fd serves exactly one VF")
        policy = PathPolicy.parse(args.msix_policy)
        if args.no_slowpath and policy is not PathPolicy.SHADOW:
            raise ValueError("--no-slowpath only makes sense with --msix-policy shadow")
        if args.backend not in BACKENDS:
            raise ValueError(f"unknown --backend {args.backend}")
        if args.backend == "libvfio-user" and args.fd is not None:
            raise ValueError("--fd is for the engine backend; libvfio-user binds "
                             "--socket-path itself")
        if args.fast_lane == "on":
            if args.backend != "engine":
                raise ValueError("--fast-lane is part of the engine backend")
            if not fastlane.available():
                raise ValueError(f"--fast-lane on: {fastlane.unavailable_reason()}")
        if args.libvfio_user is not None and args.backend != "libvfio-user":
            raise ValueError("--libvfio-user only makes sense with --backend libvfio-user")
        paths: list[str] = []
        if args.socket_path is not None:
            paths = expand_template(args.socket_path, args.vfs, "--socket-path")
        taps = (
            expand_template(args.tap[0], args.vfs, "--tap")
            if len(args.tap) == 1
            else list(args.tap)
        )
        if taps and len(taps) != args.vfs:
            raise ValueError(f"{len(taps)} taps for {args.vfs} VFs")
        if args.mac and len(args.mac) != args.vfs:
            raise ValueError(f"{len(args.mac)} MAC addresses for {args.vfs} VFs")
        return cls(
            socket_paths=paths,
            listen_fd=args.fd,
            vfs=args.vfs,
            taps=taps,
            macs=list(args.mac),
            policy=policy,
            slowpath=not args.no_slowpath,
            slowpath_timeout=args.slowpath_timeout,
            control_socket=args.control_socket,
            time_fast_path=args.time_fast_path,
            backend=args.backend,
            fast_lane={"auto": None, "on": True, "off": False}[args.fast_lane],
            libvfio_user=args.libvfio_user,
        )


def expand_template(template: str, count: int, option: str) -> list[str]:
    """``vf{vf}.sock`` -> one name per VF; a plain name is only valid for one VF."""
    if "{vf}" in template:
        return [template.replace("{vf}", str(i)) for i in range(count)]
    if count != 1:
        raise ValueError(f"{option} needs a {{vf}} template for {count} VFs")
    return [template]


class ClientView(Protocol):
    """What telemetry reads of a connected client (a ``Session``, or libvfio-user's)."""

    @property
    def irqs(self) -> IrqLines: ...


class EndpointView(Protocol):
    """What telemetry reads of an endpoint, whichever backend serves it."""

    @property
    def name(self) -> str: ...
    @property
    def session(self) -> ClientView | None: ...
    @property
    def sessions_served(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def counters(self) -> MessageCounters: ...


class ServerBackend(Protocol):
    """``Server`` (the engine) and ``bindings.adapter.LibvfioUserServer``."""

    @property
    def loop(self) -> EventLoop: ...
    @property
    def endpoints(self) -> Sequence[EndpointView]: ...
    def add_function(self, function: PciFunction, socket_path: str | None = None,
                     fd: int | None = None, name: str | None = None) -> object: ...
    def on_close(self, closer: Callable[[], None]) -> None: ...
    def install_signal_handlers(self) -> None: ...
    def run(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class BuiltServer:
    server: ServerBackend
    pf: Pf
    vfs: list[Igb82576Vf]
    slow_path: SlowPath | None
    counters: Counters


def build_server(config: ServerConfig) -> BuiltServer:
    """Create everything and bind the sockets; nothing runs until ``server.run()``."""
    macs = [parse_mac(text) for text in config.macs] if config.macs else None
    pf = Pf(config.vfs, macs=macs)
    counters = Counters()
    server: ServerBackend
    if config.backend == "libvfio-user":
        # Imported here: the engine never needs ctypes or the library.
        from bindings.adapter import LibvfioUserServer

        server = LibvfioUserServer(config.libvfio_user, limits=config.limits)
    else:
        server = Server(EventLoop(fast_lane=config.fast_lane), limits=config.limits)
    slow_path: SlowPath | None = None
    try:
        if config.slowpath:
            slow_path = SlowPath(timeout=config.slowpath_timeout, counters=counters)
            slow_path.start()
            slow_path.watch(server.loop)
            server.on_close(slow_path.close)
        vfs: list[Igb82576Vf] = []
        for index in range(config.vfs):
            backend: PacketBackend | None = (
                TapBackend(config.taps[index]) if config.taps else None
            )
            vf = Igb82576Vf(
                pf, index, server.loop, backend=backend, policy=config.policy,
                slow_path=slow_path,
                counters=Counters(process_cpu=False, time_fast_path=config.time_fast_path),
                compiled=config.fast_lane,
            )
            server.on_close(vf.close)
            vfs.append(vf)
            path = config.socket_paths[index] if config.socket_paths else None
            server.add_function(vf, socket_path=path, fd=config.listen_fd, name=vf.name)
        built = BuiltServer(server, pf, vfs, slow_path, counters)
        if config.control_socket:
            control = ControlServer(config.control_socket, server.loop,
                                    lambda: server_snapshot(built))
            server.on_close(control.close)
    except BaseException:
        server.close()
        raise
    log.info(
        "app.ready",
        backend=config.backend,
        vfs=config.vfs,
        policy=config.policy.value,
        fast_lane=server.loop.lanes is not None,
        slowpath=slow_path.pid if slow_path else None,
        macs=[vf.pf.vf(vf.vf_index).mac.hex(":") for vf in vfs],
    )
    return built


def run_server(config: ServerConfig) -> int:
    built = build_server(config)
    built.server.install_signal_handlers()
    with contextlib.suppress(KeyboardInterrupt):
        built.server.run()
    return 0

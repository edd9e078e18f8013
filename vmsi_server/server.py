"""The server process: one listening socket per function, one event loop.

Each endpoint serves one PCI function to at most one client at a time (a
second client is refused: vfio-user is one client per device). When a client
goes, its session is torn down and the endpoint listens again, so a QEMU
restart or a guest reboot keeps working. SIGTERM and SIGINT stop the loop
through a wakeup fd, and every socket file is removed on the way out.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from vmsi_server.pci.function import PciFunction
from vmsi_server.session import Session, SessionLimits
from vmsi_server.telemetry.messages import MessageCounters
from vmsi_server.transport.listener import AcceptFailed, Listener
from vmsi_server.transport.loop import EventLoop
from vmsi_server.transport.signals import StopOnSignals

log = structlog.get_logger("vmsi.server")


@dataclass
class Endpoint:
    """A function, its listener and its current session."""

    name: str
    function: PciFunction
    listener: Listener
    session: Session | None = None
    sessions_served: int = 0
    refused: int = 0
    counters: MessageCounters = field(default_factory=MessageCounters)


class Server:
    """Owns the loop and the endpoints; ``run()`` returns after a stop signal."""

    def __init__(
        self,
        loop: EventLoop | None = None,
        limits: SessionLimits | None = None,
    ) -> None:
        self.loop = loop or EventLoop()
        self.limits = limits or SessionLimits()
        self.endpoints: list[Endpoint] = []
        self._signals: StopOnSignals | None = None
        self._closers: list[Callable[[], None]] = []

    # -- setup --------------------------------------------------------
    def add_function(
        self,
        function: PciFunction,
        socket_path: str | None = None,
        fd: int | None = None,
        name: str | None = None,
    ) -> Endpoint:
        listener = Listener(path=socket_path, fd=fd)
        endpoint = Endpoint(name or function.name, function, listener)
        self.endpoints.append(endpoint)
        self.loop.add_reader(listener.fileno(), lambda: self._accept(endpoint))
        log.info("server.listening", device=endpoint.name, socket=socket_path, fd=fd)
        return endpoint

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` when the server shuts down (slow-path workers, taps)."""
        self._closers.append(closer)

    def install_signal_handlers(
        self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        self._signals = StopOnSignals(self.loop, signals)

    # -- clients ------------------------------------------------------
    def _accept(self, endpoint: Endpoint) -> None:
        try:
            conn = endpoint.listener.accept()
        except AcceptFailed as exc:
            log.error("server.accept_failed", device=endpoint.name, error=str(exc))
            fd = endpoint.listener.fileno()
            self.loop.remove_reader(fd)
            self.loop.call_later(
                0.5, lambda: self.loop.add_reader(fd, lambda: self._accept(endpoint))
            )
            return
        if conn is None:
            return
        if endpoint.session is not None:
            # The old client may already be gone with its EOF still queued
            # (a QEMU restart connects at once): settle that before refusing.
            endpoint.session.drain()
        if endpoint.session is not None:
            endpoint.refused += 1
            log.warning("server.client_refused", device=endpoint.name, reason="busy")
            _refuse(conn)
            return
        endpoint.sessions_served += 1
        session = Session(
            conn,
            endpoint.function,
            self.loop,
            limits=self.limits,
            counters=endpoint.counters,
            on_closed=lambda: self._session_closed(endpoint),
            name=endpoint.name,
        )
        endpoint.session = session
        try:
            session.start()
        except Exception:
            log.exception("server.attach_failed", device=endpoint.name)
            session.close("device attach failed")

    def _session_closed(self, endpoint: Endpoint) -> None:
        endpoint.session = None
        log.info("server.listening_again", device=endpoint.name)

    # -- running ------------------------------------------------------
    def run(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.close()

    def close(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.session is not None:
                endpoint.session.close("server shutting down")
            self.loop.remove_reader(endpoint.listener.fileno())
            endpoint.listener.close()
        self.endpoints.clear()
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                log.exception("server.closer_failed", closer=repr(closer))
        self._closers.clear()
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        log.info("server.stopped")


def _refuse(conn: socket.socket) -> None:
    """Close a second client at once: it sees EOF before its VERSION is answered."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()

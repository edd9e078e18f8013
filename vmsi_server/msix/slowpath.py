"""The slow path, from the server's side: spawn, call, supervise, replay.

``SlowPath`` starts ``slowpath_worker`` as a child process joined by a
``SOCK_SEQPACKET`` socketpair (the child's end passed with ``pass_fds``;
stdin, stdout and stderr inherited), and forwards ioreq records to it: one
request, one response, per forwarded access.

Every wait is bounded (``timeout``, default 1 s). When a call times out, the
channel reaches EOF (the worker died) or the reply is malformed:

1. the worker is killed (SIGKILL) and reaped (its CPU time kept);
2. a new worker is spawned and every registered function's state is replayed
   into it from the fast path's shadow (``ReplaySource.replay_records``), then
   each source's ``replayed()`` completion hook runs;
3. ``slowpath.restarted`` is logged, counters move, and the call raises
   ``SlowPathError`` (ETIMEDOUT or EIO): an ``AccessError``, so the session
   turns it into an error reply and keeps serving.

If the restart itself fails, the slow path stays down and the next call (or
``check()``) tries again. A worker refusing a request (bad offset, unknown
function) is not a failure of the worker: that call raises ``SlowPathError``
with the worker's errno and nothing restarts.

The restart happens inside the failing call, so that call takes up to
``timeout`` plus one worker start (~tens of ms) plus the replay.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from vmsi_server.msix.ioreq import (
    FAULT_HOOKS_ENV,
    READY_SEQ,
    REQUEST,
    RESPONSE,
    Op,
)
from vmsi_server.pci.function import AccessError
from vmsi_server.telemetry.counters import AccessStat, Counters
from vmsi_server.telemetry.cpu import pid_cpu_seconds, rusage_seconds

if TYPE_CHECKING:
    from vmsi_server.transport.loop import EventLoop

log = structlog.get_logger("vmsi.msix.slowpath")

WORKER_MODULE = "vmsi_server.msix.slowpath_worker"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


class SlowPathError(AccessError):
    """A forwarded access failed; ``errno`` is ETIMEDOUT, EIO or the worker's refusal."""


class ReplaySource(Protocol):
    """What a registered function gives the supervisor to rebuild a new worker."""

    def replay_records(self) -> Iterable[tuple[Op, int, int, int]]:
        """(op, offset, size, data) records that recreate the device-side state."""
        ...

    def replayed(self) -> None:
        """The new worker took the replay: the fast path's writes are acknowledged.

        Must not call the slow path (it runs inside a call).
        """
        ...


class _ChannelDown(Exception):
    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason


class SlowPath:
    """Supervisor and client of one slow-path worker shared by several functions."""

    def __init__(
        self,
        *,
        timeout: float = 1.0,
        start_timeout: float = 10.0,
        counters: Counters | None = None,
        fault_hooks: bool = False,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.counters = counters if counters is not None else Counters(process_cpu=False)
        self.fault_hooks = fault_hooks
        self.argv: list[str] = (
            list(argv) if argv is not None else [sys.executable, "-m", WORKER_MODULE]
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._poll = select.poll()
        self._seq = READY_SEQ
        self._sources: dict[int, tuple[int, ReplaySource]] = {}
        self._reaped_cpu = 0.0
        self._loop: EventLoop | None = None
        self._in_call = False
        self._op_stats: list[AccessStat] = [
            self.counters.access("slowpath", op.name.lower(), "round-trip") for op in Op
        ]
        self.counters.add_gauge("cpu.slowpath_seconds", self.cpu_seconds)

    # -- lifecycle ----------------------------------------------------
    def start(self) -> None:
        """Spawn the worker (if not running) and replay registered functions."""
        if self._sock is None:
            self._start_and_replay()

    def __enter__(self) -> SlowPath:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._sock is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    @property
    def restarts(self) -> int:
        return self.counters.get("slowpath.restarts")

    @property
    def timeouts(self) -> int:
        return self.counters.get("slowpath.timeouts")

    @property
    def errors(self) -> int:
        return self.counters.get("slowpath.errors")

    def close(self) -> None:
        """Close the channel (the worker exits on EOF), reap it, stop supervising."""
        self._stop_worker(graceful=True)
        self.counters.remove_gauge("cpu.slowpath_seconds")
        self._loop = None

    # -- functions ----------------------------------------------------
    def register(self, function_id: int, vectors: int, source: ReplaySource) -> None:
        """Add a function: the worker creates its table now and after every restart."""
        if function_id in self._sources:
            raise ValueError(f"function {function_id} already registered with the slow path")
        if not 0 <= function_id <= 0xFFFF:
            raise ValueError(f"function id {function_id} does not fit u16")
        self._sources[function_id] = (vectors, source)
        if self._sock is None:
            self._start_and_replay()
        else:
            self.call(Op.FUNCTION_ADD, function_id, data=vectors)

    def unregister(self, function_id: int) -> None:
        if self._sources.pop(function_id, None) is not None and self._sock is not None:
            with contextlib.suppress(SlowPathError):  # a restarted worker lacks it anyway
                self.call(Op.FUNCTION_REMOVE, function_id)

    # -- the round trip -----------------------------------------------
    def call(self, op: Op, function_id: int, offset: int = 0, size: int = 0, data: int = 0) -> int:
        """One request, one response; returns the response's data.

        Raises ``SlowPathError``: the worker's errno if it refused the request;
        ETIMEDOUT or EIO if the worker hung or died (after restarting it).
        """
        if self._in_call:
            raise RuntimeError("SlowPath.call re-entered (from a replayed() hook?)")
        if self._sock is None:
            if self._proc is None:
                self.start()
            else:
                self._recover("worker not running")  # raises if it cannot start
        stat = self._op_stats[op]
        self._in_call = True
        t0 = time.perf_counter_ns()
        try:
            value = self._roundtrip(op, function_id, offset, size, data)
        except _ChannelDown as down:
            self._in_call = False
            stat.errors += 1
            self.counters.incr("slowpath.errors")
            if down.errno == errno.ETIMEDOUT:
                self.counters.incr("slowpath.timeouts")
            self._recover(f"{op.name}: {down.reason}", quiet=True)
            raise SlowPathError(down.errno, f"slow path {op.name}: {down.reason}") from None
        finally:
            self._in_call = False
        stat.record(time.perf_counter_ns() - t0)
        if value < 0:
            self.counters.incr("slowpath.refused")
            raise SlowPathError(-value, f"slow path refused {op.name}")
        return value

    def _roundtrip(self, op: int, function_id: int, offset: int, size: int, data: int) -> int:
        """Returns data, or -errno when the worker refused; raises _ChannelDown."""
        sock = self._sock
        if sock is None:
            raise _ChannelDown(errno.EIO, "worker not running")
        seq = self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        try:
            sock.send(REQUEST.pack(seq, op, function_id, offset, size, data))
            if not self._poll.poll(self.timeout * 1000.0):
                raise _ChannelDown(errno.ETIMEDOUT, f"no answer within {self.timeout:g}s")
            record = sock.recv(64)
        except OSError as e:
            raise _ChannelDown(errno.EIO, f"channel: {e}") from None
        if not record:
            raise _ChannelDown(errno.EIO, "worker closed the channel (died?)")
        if len(record) != RESPONSE.size:
            raise _ChannelDown(errno.EIO, f"{len(record)}-byte response")
        rseq: int
        status: int
        value: int
        rseq, status, value = RESPONSE.unpack(record)
        if rseq != seq:
            raise _ChannelDown(errno.EIO, f"response seq {rseq} for request {seq}")
        return -status if status else value

    # -- supervision --------------------------------------------------
    def check(self) -> bool:
        """Restart a worker that died between calls; True when one is running."""
        if self._in_call:
            return True
        if self._sock is not None and self._proc is not None and self._running(self._proc):
            return True
        reason = "worker not running" if self._proc is None else "worker exited"
        try:
            self._recover(reason)
        except SlowPathError:
            return False
        return True

    def watch(self, loop: EventLoop) -> None:
        """Have ``loop`` notice a worker's death (EOF on the channel) between calls."""
        self._loop = loop
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        if self._in_call or self._sock is None:
            return
        try:
            record = self._sock.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            record = b""
        reason = "worker closed the channel (died?)" if not record else "unsolicited record"
        with contextlib.suppress(SlowPathError):  # logged and counted; the next call retries
            self._recover(reason)

    def _recover(self, reason: str, *, quiet: bool = False) -> None:
        """Kill, respawn, replay. Raises SlowPathError if there is no worker afterwards."""
        old_pid = self._proc.pid if self._proc is not None else None
        self._stop_worker(graceful=False)
        self.counters.incr("slowpath.restarts")
        try:
            self._start_and_replay()
        except SlowPathError as e:
            self.counters.incr("slowpath.restart_failures")
            log.error("slowpath.restart_failed", reason=reason, error=e.reason, old_pid=old_pid)
            if quiet:
                return
            raise
        log.warning(
            "slowpath.restarted",
            reason=reason,
            old_pid=old_pid,
            pid=self.pid,
            restarts=self.restarts,
        )

    def _start_and_replay(self) -> None:
        self._spawn()
        try:
            for function_id, (vectors, source) in list(self._sources.items()):
                self._replay_one(Op.FUNCTION_ADD, function_id, 0, 0, vectors)
                for op, offset, size, data in source.replay_records():
                    self._replay_one(op, function_id, offset, size, data)
        except _ChannelDown as down:
            self._stop_worker(graceful=False)
            raise SlowPathError(down.errno, f"replay into new worker: {down.reason}") from None
        for _vectors, source in list(self._sources.values()):
            source.replayed()

    def _replay_one(self, op: Op, function_id: int, offset: int, size: int, data: int) -> None:
        value = self._roundtrip(op, function_id, offset, size, data)
        if value < 0:
            raise _ChannelDown(errno.EIO, f"worker refused replayed {op.name} ({-value})")

    def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        pythonpath = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + pythonpath if pythonpath else "")
        if self.fault_hooks:
            env[FAULT_HOOKS_ENV] = "1"
        else:
            env.pop(FAULT_HOOKS_ENV, None)
        try:
            proc = subprocess.Popen(
                [*self.argv, "--fd", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=env,
            )
        except OSError as e:
            parent.close()
            raise SlowPathError(errno.EIO, f"cannot start the slow-path worker: {e}") from None
        finally:
            child.close()
        self._proc, self._sock = proc, parent
        self._poll = select.poll()
        self._poll.register(parent.fileno(), _POLL_IN)
        try:
            if not self._poll.poll(self.start_timeout * 1000.0):
                raise SlowPathError(errno.ETIMEDOUT, "slow-path worker did not start in time")
            record = parent.recv(64)
            if len(record) != RESPONSE.size or RESPONSE.unpack(record)[0] != READY_SEQ:
                raise SlowPathError(errno.EIO, "slow-path worker exited before it was ready")
        except (SlowPathError, OSError) as e:
            self._stop_worker(graceful=False)
            if isinstance(e, SlowPathError):
                raise
            raise SlowPathError(errno.EIO, f"slow-path worker start: {e}") from None
        self._seq = READY_SEQ
        if self._loop is not None:
            self._loop.add_reader(parent.fileno(), self._on_readable)
        log.info("slowpath.started", pid=proc.pid)

    def _stop_worker(self, *, graceful: bool) -> None:
        sock, proc = self._sock, self._proc
        self._sock = None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            self._poll.unregister(sock.fileno())
            sock.close()
        if proc is None or proc.returncode is not None:
            return
        if graceful:  # EOF makes the worker exit; give it a moment
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if self._reap(proc, os.WNOHANG):
                    return
                time.sleep(0.002)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        self._reap(proc, 0)

    @staticmethod
    def _running(proc: subprocess.Popen[bytes]) -> bool:
        """Still running? (waitid WNOWAIT: does not reap, so wait4 still gets the rusage)."""
        try:
            result = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return result is None

    def _reap(self, proc: subprocess.Popen[bytes], options: int) -> bool:
        """wait4 the worker (for its final CPU time); True once it is reaped."""
        try:
            pid, status, usage = os.wait4(proc.pid, options)
        except ChildProcessError:  # reaped elsewhere; its CPU time is lost
            if proc.returncode is None:
                proc.returncode = -1
            return True
        if pid == 0:
            return False
        self._reaped_cpu += rusage_seconds(usage)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return True

    # -- accounting ---------------------------------------------------
    def cpu_seconds(self) -> float:
        """User + system CPU of every worker so far (reaped ones and the live one)."""
        live = 0.0
        proc = self._proc
        if proc is not None and proc.returncode is None:
            live = pid_cpu_seconds(proc.pid) or 0.0
        return self._reaped_cpu + live

"""Drive many simulated guests: one selector loop per process, optional worker processes.

``Replay`` is one process's share: its guests' eventfds and sockets in one
selector, a heap of due events (interrupts to raise, affinity moves), and the
handler for each readable eventfd. Client calls block (a synchronous table
read is a vCPU waiting for its MMIO exit to finish), so at most one request
per process is outstanding; posted writes pipeline.

Arrivals are Poisson per guest (exponential gaps, seeded), so 24 guests do
not beat in step. The schedule is fixed up front (each next arrival counts
from the previous scheduled time, not from "now"), so a load generator that
falls behind catches up in bursts instead of quietly lowering the rate;
``late`` counts events run more than ``LATE_S`` after their time, so a run
whose generator could not keep up says so.

``ReplayRun`` is what callers use: ``setup()`` (connect and program every
guest), ``run()`` (the measured part), ``close()``. With ``workers > 1`` the
guests are split among that many processes (spawned, one pipe each), started
together and merged into one ``ReplayStats``.
"""

from __future__ import annotations

import heapq
import multiprocessing
import random
import selectors
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from vmsi_server.replay.guest import SimulatedGuest
from vmsi_server.replay.model import LoadModel
from vmsi_server.replay.stats import ReplayStats
from vmsi_server.telemetry.cpu import process_cpu_seconds

LATE_S = 0.005
DRAIN_S = 0.2
"""After the run, how long to keep handling interrupts already raised."""
BURST = 64
"""Due events run per loop turn before the selector is looked at again."""

_RAISE, _MOVE = 0, 1


class Replay:
    """The guests of one process."""

    def __init__(
        self,
        model: LoadModel,
        socket_paths: Sequence[str],
        *,
        first_guest: int = 0,
        timeout: float = 5.0,
    ) -> None:
        self.model = model
        self.paths = list(socket_paths)
        self.first_guest = first_guest
        self.timeout = timeout
        self.guests: list[SimulatedGuest] = []
        self.setup_stats = ReplayStats()
        self.late = 0

    def setup(self) -> ReplayStats:
        """Connect and program every guest (counted apart from the run)."""
        stats = self.setup_stats
        for n, path in enumerate(self.paths):
            guest = SimulatedGuest(
                self.first_guest + n, path, self.model.kernel, stats, timeout=self.timeout
            )
            self.guests.append(guest)
            guest.setup()
            stats.guests += 1
        return stats

    def run(self, duration: float | None = None) -> ReplayStats:
        model = self.model
        seconds = model.duration if duration is None else duration
        stats = ReplayStats(guests=len(self.guests))
        for g in self.guests:
            g.stats = stats
        rng = random.Random(model.seed * 1_000_003 + self.first_guest)
        vectors = model.vectors
        rate, moves, contention = model.rate, model.affinity_rate, model.contention
        turn = [0] * len(self.guests)
        move_turn = [0] * len(self.guests)

        sel = selectors.DefaultSelector()
        for i, g in enumerate(self.guests):
            sel.register(g.client.fileno(), selectors.EVENT_READ, (i, -1))
            for v, fd in enumerate(g.eventfds):
                sel.register(fd, selectors.EVENT_READ, (i, v))

        cpu0 = process_cpu_seconds()
        start = time.monotonic()
        end = start + seconds
        heap: list[tuple[float, int, int]] = []
        for i in range(len(self.guests)):
            if rate > 0:
                heap.append((start + rng.expovariate(rate), _RAISE, i))
            if moves > 0:
                heap.append((start + rng.expovariate(moves), _MOVE, i))
        heapq.heapify(heap)
        late = 0
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                burst = 0
                while heap and heap[0][0] <= now and burst < BURST:
                    when, kind, i = heapq.heappop(heap)
                    burst += 1
                    g = self.guests[i]
                    if g.closed:
                        continue
                    if now - when > LATE_S:
                        late += 1
                    try:
                        if kind == _RAISE:
                            g.raise_interrupt(vectors[turn[i] % len(vectors)])
                            turn[i] += 1
                            heapq.heappush(heap, (when + rng.expovariate(rate), _RAISE, i))
                        else:
                            g.move_affinity(vectors[move_turn[i] % len(vectors)])
                            move_turn[i] += 1
                            heapq.heappush(heap, (when + rng.expovariate(moves), _MOVE, i))
                    except Exception as exc:  # the guest's connection broke: count, drop
                        self._drop(sel, i, stats, exc)
                timeout = 0.0 if burst >= BURST else max(0.0, min(end, heap[0][0] if heap else end)
                                                         - time.monotonic())
                self._handle_ready(sel, sel.select(timeout), stats, rng, contention)
            drain_end = time.monotonic() + DRAIN_S
            while (left := drain_end - time.monotonic()) > 0:
                ready = sel.select(min(left, 0.02))
                if not ready:
                    break
                self._handle_ready(sel, ready, stats, rng, contention)
        finally:
            sel.close()
        stats.seconds = time.monotonic() - start
        stats.load_cpu_seconds = process_cpu_seconds() - cpu0
        self.late = late
        return stats

    def _handle_ready(
        self,
        sel: selectors.BaseSelector,
        ready: list[tuple[selectors.SelectorKey, int]],
        stats: ReplayStats,
        rng: random.Random,
        contention: float,
    ) -> None:
        for key, _ in ready:
            i, v = key.data
            g = self.guests[i]
            if g.closed:
                continue
            if v < 0:  # the server never speaks first: this is EOF or garbage
                self._drop(sel, i, stats, ConnectionError("server closed the connection"))
                continue
            try:
                g.handle(v, contention > 0 and rng.random() < contention)
            except Exception as exc:
                self._drop(sel, i, stats, exc)

    def _drop(
        self, sel: selectors.BaseSelector, i: int, stats: ReplayStats, exc: BaseException
    ) -> None:
        g = self.guests[i]
        stats.error(f"guest {g.index} ({g.socket_path}): {type(exc).__name__}: {exc}")
        for fd in [g.client.fileno(), *g.eventfds]:
            try:
                sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        g.close()

    def close(self) -> None:
        for g in self.guests:
            g.close()
        self.guests.clear()


def _worker_main(
    conn: Connection, model: LoadModel, paths: list[str], first_guest: int, timeout: float
) -> None:
    replay = Replay(model, paths, first_guest=first_guest, timeout=timeout)
    try:
        try:
            replay.setup()
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ready", None))
        while True:
            command, arg = conn.recv()
            if command == "run":
                stats = replay.run(arg)
                conn.send(("done", (stats, replay.late)))
            else:
                return
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        replay.close()
        conn.close()


class ReplayRun:
    """Set up, run and close N guests over one or several processes."""

    def __init__(
        self, model: LoadModel, socket_paths: Sequence[str], *, timeout: float = 5.0
    ) -> None:
        if len(socket_paths) != model.guests:
            raise ValueError(f"{len(socket_paths)} sockets for {model.guests} guests")
        self.model = model
        self.paths = list(socket_paths)
        self.timeout = timeout
        self.late = 0
        self._local: Replay | None = None
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def __enter__(self) -> ReplayRun:
        self.setup()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def setup(self) -> None:
        workers = self.model.processes
        if workers == 1:
            self._local = Replay(self.model, self.paths, timeout=self.timeout)
            try:
                self._local.setup()
            except BaseException:
                self.close()
                raise
            return
        ctx = multiprocessing.get_context("spawn")
        try:
            n = len(self.paths)
            for w in range(workers):
                first, last = w * n // workers, (w + 1) * n // workers
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child, self.model, self.paths[first:last], first, self.timeout),
                    name=f"replay-worker-{w}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._workers.append((proc, parent))
            for worker, conn in self._workers:
                status, detail = self._recv(conn, worker)
                if status != "ready":
                    raise RuntimeError(f"{worker.name}: setup failed: {detail}")
        except BaseException:
            self.close()
            raise

    def run(self, duration: float | None = None) -> ReplayStats:
        if self._local is not None:
            stats = self._local.run(duration)
            self.late = self._local.late
            return stats
        if not self._workers:
            raise RuntimeError("run() before setup()")
        for _proc, conn in self._workers:
            conn.send(("run", duration))
        total = ReplayStats()
        self.late = 0
        for proc, conn in self._workers:
            status, detail = self._recv(conn, proc)
            if status != "done":
                raise RuntimeError(f"{proc.name}: run failed: {detail}")
            stats, late = detail
            total.merge(stats)
            self.late += late
        return total

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for proc, conn in self._workers:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self._workers.clear()

    def _recv(self, conn: Connection, proc: multiprocessing.process.BaseProcess) -> Any:
        deadline = self.model.duration + 60.0
        if not conn.poll(deadline):
            raise RuntimeError(f"{proc.name}: no answer within {deadline:.0f}s")
        try:
            return conn.recv()
        except EOFError:
            raise RuntimeError(f"{proc.name}: exited (code {proc.exitcode})") from None
